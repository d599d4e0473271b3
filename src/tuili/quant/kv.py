"""Int8 KV-cache quantization for the engine: symmetric codes with one scale per token (per head)
or per head (over a block of tokens). Keys and values are (…, H, T, D)."""

from __future__ import annotations

import torch
from torch import Tensor

from tuili.quant.primitives import check_finite, qrange

GRANULARITIES = ("token", "head")


def quantize_kv(x: Tensor, granularity: str = "token") -> tuple[Tensor, Tensor]:
    """int8 codes and fp32 scales: "token" → scale (…, H, T, 1) over D; "head" → (…, H, 1, 1) over T and D.

    Per-token scales never need rescaling when tokens are appended; per-head scales are smaller
    but fixed once a block is written.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    check_finite(x, "KV cache tensor")
    qmax = qrange(8, symmetric=True)[1]
    dims = (-1,) if granularity == "token" else (-2, -1)
    scale = x.float().abs().amax(dim=dims, keepdim=True).clamp(min=1e-8) / qmax
    return (x.float() / scale).round().clamp(-qmax, qmax).to(torch.int8), scale


def dequantize_kv(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * scale).to(dtype)
