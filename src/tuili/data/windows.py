"""Token windows: non-overlapping ones for perplexity, seeded random ones for calibration."""

from __future__ import annotations

import torch
from torch import Tensor

from tuili.errors import DataError


def eval_windows(ids: list[int] | Tensor, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """(N, seq_len) consecutive, non-overlapping windows from the start of `ids`.

    `max_tokens` caps N · seq_len (the field reports e.g. "the first 65,536 tokens"); the tail that
    does not fill a window is dropped, so every window has the same length.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    usable = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    num = usable // seq_len
    if num == 0:
        raise DataError(f"the text has {ids.numel()} tokens: too few for one {seq_len}-token window")
    return ids[: num * seq_len].view(num, seq_len)


def calibration_samples(ids: list[int] | Tensor, num_samples: int, seq_len: int, seed: int = 0) -> Tensor:
    """(num_samples, seq_len) windows at random offsets, the same for the same seed (as GPTQ samples C4)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() < seq_len:
        raise DataError(f"the text has {ids.numel()} tokens: too few for a {seq_len}-token sample")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
