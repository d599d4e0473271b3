"""Where text comes from: the built-in corpus, a text file, JSONL, or a hub dataset (network)."""

from __future__ import annotations

import json
from pathlib import Path

from tuili.data.corpus import SPLITS, builtin_text
from tuili.errors import DataError

BUILTIN = "builtin"


def load_text(spec: str = BUILTIN, split: str = "evaluation") -> str:
    """Read text from a data spec.

    - "builtin" (the split given) or "builtin:calibration" / "builtin:evaluation"
    - a .txt (or any text) file; a .jsonl file, field "text", or "file.jsonl:FIELD"
    - "hf:NAME[:CONFIG[:SPLIT]]", a dataset on the Hugging Face hub (needs network and `datasets`)
    """
    if spec == BUILTIN or spec.startswith(BUILTIN + ":"):
        _, _, named = spec.partition(":")
        return builtin_text(named or split)
    if spec.startswith("hf:"):
        return _hub_text(spec[3:], split)
    path, field = _jsonl_field(spec)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (use 'builtin', a text file, a .jsonl file or hf:NAME)")
    if path.suffix == ".jsonl":
        return _jsonl_text(path, field)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e


def _jsonl_field(spec: str) -> tuple[Path, str]:
    head, sep, field = spec.rpartition(":")
    if sep and head.endswith(".jsonl") and field:
        return Path(head).expanduser(), field
    return Path(spec).expanduser(), "text"


def _jsonl_text(path: Path, field: str) -> str:
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{number}: no string field {field!r} (name another field with {path}:FIELD)")
            texts.append(record[field])
    if not texts:
        raise DataError(f"{path}: no records")
    return "\n\n".join(texts)


def _hub_text(name: str, split: str) -> str:
    parts = name.split(":")
    dataset, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    hub_split = parts[2] if len(parts) > 2 else ("test" if split == "evaluation" else "train")
    try:
        import datasets
    except ImportError as e:
        raise DataError("hub datasets need the `datasets` package: pip install datasets") from e
    try:
        rows = datasets.load_dataset(dataset, config, split=hub_split)
    except Exception as e:  # offline, unknown name, missing split
        raise DataError(f"hf:{name}: could not load the dataset ({type(e).__name__}: {e})") from e
    if "text" not in rows.column_names:
        raise DataError(f"hf:{name}: no 'text' column (columns: {', '.join(rows.column_names)})")
    return "\n\n".join(t for t in rows["text"] if t)


__all__ = ["BUILTIN", "SPLITS", "load_text"]
