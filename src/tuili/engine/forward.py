"""One packed forward step of a model over its paged KV cache: segments of consecutive tokens, one per
sequence, in one row; the C++ decode step where every segment is one token and the plan applies, the
module forward otherwise. The engine runs its model through it, and speculative decoding its draft."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from tuili.engine.blocks import BlockTable
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.step import DecodeStep
from tuili.kernels import ops as kernels
from tuili.quant.kernel_layer import compute_dtype as computing_in

Segment = tuple[BlockTable, int, int]  # (a sequence's blocks, its first position here, tokens)


def packed_forward(
    module: nn.Module,
    decode_step: DecodeStep | None,
    cache: PagedKVCache,
    segments: list[Segment],
    ids: list[int],
    logits_at: list[int],
    dtype: torch.dtype | None = None,
    check: bool = True,
) -> tuple[Tensor, bool]:
    """Logits (len(logits_at), V) at those indices of the packed tokens `ids`, and whether the C++
    step ran them (`check`: look again whether the model still matches its plan)."""
    cache.bind([s[0] for s in segments], [s[1] for s in segments], [s[2] for s in segments])
    device = cast(torch.device, module.device)  # LlamaForCausalLM's
    positions = [p for _, start, n in segments for p in range(start, start + n)]
    ids_t, positions_t = torch.tensor(ids, device=device), torch.tensor(positions, device=device)
    at = torch.tensor(logits_at, dtype=torch.long, device=device)
    with computing_in(dtype):
        if decode_step is not None:
            logits = decode_step(cache, ids_t, positions_t, at, dtype, check)
            if logits is not None:
                return logits, True
        return module(ids_t[None], positions_t[None], cache, logits_at=at).logits[0], False


def engine_compute_dtype(model_dtype: torch.dtype, bf16_activations: bool | None = None) -> torch.dtype | None:
    """The `compute_dtype` the engine runs an fp32 model's weight-only layers under: bf16 where
    asked, or by default where this CPU multiplies bf16 natively; None (the activations' own) else."""
    use_bf16 = kernels.bf16_is_fast() if bf16_activations is None else bf16_activations
    return torch.bfloat16 if use_bf16 and model_dtype == torch.float32 else None
