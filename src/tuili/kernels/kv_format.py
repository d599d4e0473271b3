"""The KV cache's number formats, defined once on the ground floor for everyone who stores or reads
a cache: the kernels' paged write, the model's uncached forward (which rounds keys and values the
same way, so perplexity includes the cost), the engine's paged cache and `quantize_kv_cache_`.

int8 codes are symmetric, with one scale per token per head ("token") or per head over a block of
tokens ("head"); keys and values are (…, H, T, D).
"""

from __future__ import annotations

import torch
from torch import Tensor

KV_CACHE_FORMATS = ("float", "bfloat16", "int8")  # "float": the model's own dtype
GRANULARITIES = ("token", "head")
INT8_MAX = 127  # symmetric codes in [-127, 127]


def check_kv_cache_format(kv_dtype: str) -> None:
    if kv_dtype not in KV_CACHE_FORMATS:
        raise ValueError(f"unknown KV cache format {kv_dtype!r}: choose one of {', '.join(KV_CACHE_FORMATS)}")


def quantize_kv(x: Tensor, granularity: str = "token", check: bool = True) -> tuple[Tensor, Tensor]:
    """int8 codes and fp32 scales: "token" → scale (…, H, T, 1) over D; "head" → (…, H, 1, 1) over T and D.

    Per-token scales never need rescaling when tokens are appended; per-head scales are smaller
    but fixed once a block is written.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if check and not torch.isfinite(x).all():  # off inside a model's forward: no data-dependent branch (ONNX)
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"a KV cache tensor has {bad} NaN or Inf values: int8 codes need finite numbers")
    dims = (-1,) if granularity == "token" else (-2, -1)
    scale = x.float().abs().amax(dim=dims, keepdim=True).clamp(min=1e-8) / INT8_MAX
    return (x.float() / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_kv(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * scale).to(dtype)
