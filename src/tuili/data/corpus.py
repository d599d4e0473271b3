"""The built-in corpus: CPython's own documentation text (`pydoc_data.topics`), always offline.

Its 79 topics (about 113k SmolLM2 tokens) are split by a hash of the topic name, so the split is
the same on every machine and the two parts never share a topic.
"""

from __future__ import annotations

import zlib

SPLITS = ("calibration", "evaluation")


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def in_evaluation(topic: str) -> bool:
    """crc32(name) mod 10 < 8 goes to evaluation: about 69.8k tokens, leaving 43.1k for calibration.

    Evaluation gets the larger part so that the field's usual 64k-token perplexity fits in it.
    """
    return zlib.crc32(topic.encode()) % 10 < 8


def builtin_text(split: str = "evaluation") -> str:
    """The text of one split (or "all"), topics in sorted order joined by blank lines."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or all, got {split!r}")
    topics = _topics()
    names = sorted(topics)
    if split != "all":
        names = [n for n in names if in_evaluation(n) == (split == "evaluation")]
    return "\n\n".join(topics[n] for n in names)
