"""KV-cache formats: int8 codes for the engine (symmetric, one scale per token per head, or per head
over a block of tokens; keys and values are (…, H, T, D)), and `quantize_kv_cache_`, which sets
the format a model's caches use."""

from __future__ import annotations

import torch
from torch import Tensor

from tuili.quant.primitives import check_finite, qrange

GRANULARITIES = ("token", "head")


def quantize_kv(x: Tensor, granularity: str = "token", check: bool = True) -> tuple[Tensor, Tensor]:
    """int8 codes and fp32 scales: "token" → scale (…, H, T, 1) over D; "head" → (…, H, 1, 1) over T and D.

    Per-token scales never need rescaling when tokens are appended; per-head scales are smaller
    but fixed once a block is written.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if check:  # off inside a model's forward: no data-dependent branch (torch.export, ONNX)
        check_finite(x, "KV cache tensor")
    qmax = qrange(8, symmetric=True)[1]
    dims = (-1,) if granularity == "token" else (-2, -1)
    scale = x.float().abs().amax(dim=dims, keepdim=True).clamp(min=1e-8) / qmax
    return (x.float() / scale).round().clamp(-qmax, qmax).to(torch.int8), scale


def dequantize_kv(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * scale).to(dtype)


KV_CACHE_FORMATS = ("float", "bfloat16", "int8")  # "float": the model's own dtype


def check_kv_cache_format(kv_dtype: str) -> None:
    if kv_dtype not in KV_CACHE_FORMATS:
        raise ValueError(f"unknown KV cache format {kv_dtype!r}: choose one of {', '.join(KV_CACHE_FORMATS)}")


def quantize_kv_cache_(model, kv_dtype: str) -> None:
    """Make `model` (a Model or tuili's LlamaForCausalLM) keep its KV cache in `kv_dtype`:
    "bfloat16" (half of fp32's bytes, keys rounded to 8 mantissa bits), "int8" (a quarter, plus a
    scale per token and head) or "float" (the model's dtype). Every engine over the model then
    stores that format, its evaluation without a cache rounds keys and values the same way (so
    perplexity includes the cost), and `Model.save` records it in config.json (vLLM's
    `kv_cache_dtype`, decided by the model rather than the server)."""
    module = getattr(model, "module", model)
    config = getattr(module, "config", None)
    if not hasattr(config, "kv_cache_dtype"):
        raise ValueError(f"the KV cache format is a setting of tuili's Llama models (tuili.load); "
                         f"got {type(module).__name__}")
    check_kv_cache_format(kv_dtype)
    config.kv_cache_dtype = None if kv_dtype == "float" else kv_dtype
