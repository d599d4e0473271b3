"""`quantize_kv_cache_`: set the format a model's KV caches use (the formats themselves are
tuili.kernels.kv_format)."""

from __future__ import annotations

from typing import Any

from tuili.kernels.kv_format import check_kv_cache_format


def quantize_kv_cache_(model, kv_dtype: str) -> None:
    """Make `model` (a Model or tuili's LlamaForCausalLM) keep its KV cache in `kv_dtype`:
    "bfloat16" (half of fp32's bytes, keys rounded to 8 mantissa bits), "int8" (a quarter, plus a
    scale per token and head) or "float" (the model's dtype). Every engine over the model then
    stores that format, its evaluation without a cache rounds keys and values the same way (so
    perplexity includes the cost), and `Model.save` records it in config.json (vLLM's
    `kv_cache_dtype`, decided by the model rather than the server)."""
    module = getattr(model, "module", model)
    config: Any = getattr(module, "config", None)
    if not hasattr(config, "kv_cache_dtype"):
        raise ValueError(
            f"the KV cache format is a setting of tuili's Llama models (tuili.load); got {type(module).__name__}"
        )
    check_kv_cache_format(kv_dtype)
    config.kv_cache_dtype = None if kv_dtype == "float" else kv_dtype
