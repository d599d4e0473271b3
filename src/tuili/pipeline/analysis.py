"""What a model costs: parameters and bytes, FLOPs per token, KV-cache bytes, memory at a workload.

Counts come from the module's actual tensors (so a quantized or pruned model reports its real
bytes) and its linear shapes; attention FLOPs come from the config.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tuili.engine.paged_cache import PagedKVCache
from tuili.models.model import Model


@dataclass(frozen=True)
class Analysis:
    name: str
    architecture: str
    num_parameters: int
    num_bytes: int
    parameters_by_dtype: dict[str, int]
    bytes_by_dtype: dict[str, int]
    parameters_by_kind: dict[str, int]
    bytes_by_kind: dict[str, int]
    context_len: int
    batch_size: int
    kv_dtype: str
    prefill_flops_per_token: float  # averaged over a prompt of context_len tokens
    decode_flops_per_token: float  # one new token with context_len tokens cached
    kv_bytes_per_token: int
    kv_cache_bytes: int  # batch_size × context_len tokens
    memory_bytes: int  # weights + KV cache

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_kind(name: str) -> str:
    """Which part of a decoder a state-dict entry belongs to."""
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if "self_attn" in name:
        return "attention linear"
    if ".mlp." in name:
        return "mlp linear"
    if "norm" in name:
        return "norm"
    return "other"


def analyze(
    model: Model, context_len: int = 2048, batch_size: int = 1, kv_dtype: torch.dtype | None = None
) -> Analysis:
    """Parameters, bytes, FLOPs/token and memory of `model` at `batch_size` × `context_len` tokens."""
    if context_len < 1 or batch_size < 1:
        raise ValueError(f"context_len and batch_size must be positive, got {context_len}, {batch_size}")
    cfg, module = model.config, model.module
    by_dtype, bytes_dtype = defaultdict(int), defaultdict(int)
    by_kind, bytes_kind = defaultdict(int), defaultdict(int)
    for name, t in _unique_tensors(module):
        dtype = str(t.dtype).removeprefix("torch.")
        kind = tensor_kind(name)
        by_dtype[dtype] += t.numel()
        bytes_dtype[dtype] += t.numel() * t.element_size()
        by_kind[kind] += t.numel()
        bytes_kind[kind] += t.numel() * t.element_size()
    linear_flops = 2 * sum(
        m.in_features * m.out_features
        for m in module.modules()
        if isinstance(m, nn.Linear) or hasattr(m, "in_features")
    )
    # scores q·kᵀ and the weighted sum of v: 2 · 2 · H · D multiply-adds per cached key, per layer
    attn_per_key = 4 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    kv_dtype = kv_dtype or PagedKVCache.dtype_for(cfg, module.dtype)  # what the engine's cache stores
    kv_per_token = PagedKVCache.bytes_per_token(cfg, kv_dtype)
    kv_cache = kv_per_token * context_len * batch_size
    weights = sum(bytes_dtype.values())
    return Analysis(
        name=model.source,
        architecture=cfg.architecture,
        num_parameters=sum(by_dtype.values()),
        num_bytes=weights,
        parameters_by_dtype=dict(by_dtype),
        bytes_by_dtype=dict(bytes_dtype),
        parameters_by_kind=dict(by_kind),
        bytes_by_kind=dict(bytes_kind),
        context_len=context_len,
        batch_size=batch_size,
        kv_dtype=str(kv_dtype).removeprefix("torch."),
        prefill_flops_per_token=linear_flops + attn_per_key * (context_len + 1) / 2,
        decode_flops_per_token=linear_flops + attn_per_key * context_len,
        kv_bytes_per_token=kv_per_token,
        kv_cache_bytes=kv_cache,
        memory_bytes=weights + kv_cache,
    )


def module_bytes(module: nn.Module) -> int:
    """Bytes of the module's persistent tensors, each storage counted once (as `analyze` counts them)."""
    return sum(t.numel() * t.element_size() for _, t in _unique_tensors(module))


def _unique_tensors(module: nn.Module):
    """Persistent parameters and buffers, each storage counted once (tied embeddings share one)."""
    seen = set()
    for name, t in module.state_dict(keep_vars=True).items():
        key = (id(t),) if t.is_meta else (t.data_ptr(), t.numel(), t.dtype)  # meta: a lazy model's layers
        if key in seen:
            continue
        seen.add(key)
        yield name, t


def analysis_tables(a: Analysis) -> list[tuple[list[str], list[list[str]]]]:
    """The analysis as (headers, rows) tables: by kind, by dtype, then compute and memory."""
    from tuili.pipeline.report import human_bytes, human_count

    kinds = (
        ["part", "parameters", "bytes", "share"],
        [
            [k, f"{n:,}", human_bytes(a.bytes_by_kind[k]), f"{100 * n / a.num_parameters:.1f}%"]
            for k, n in sorted(a.parameters_by_kind.items(), key=lambda kv: -kv[1])
        ]
        + [["total", f"{a.num_parameters:,}", human_bytes(a.num_bytes), "100.0%"]],
    )
    dtypes = (
        ["dtype", "parameters", "bytes"],
        [[d, f"{n:,}", human_bytes(a.bytes_by_dtype[d])] for d, n in a.parameters_by_dtype.items()],
    )
    ctx = f"{a.context_len:,}"
    compute = (
        ["quantity", "value"],
        [
            [f"prefill FLOPs/token (prompt of {ctx})", human_count(a.prefill_flops_per_token, "FLOP")],
            [f"decode FLOPs/token (context {ctx})", human_count(a.decode_flops_per_token, "FLOP")],
            [f"KV cache per token ({a.kv_dtype})", human_bytes(a.kv_bytes_per_token)],
            [f"KV cache, batch {a.batch_size} × {ctx} tokens", human_bytes(a.kv_cache_bytes)],
            ["weights + KV cache", human_bytes(a.memory_bytes)],
        ],
    )
    return [kinds, dtypes, compute]


def analysis_markdown(a: Analysis) -> str:
    """The analysis as markdown tables: by kind, by dtype, then compute and memory."""
    from tuili.pipeline.report import markdown_table

    return "\n\n".join(markdown_table(h, r) for h, r in analysis_tables(a))
