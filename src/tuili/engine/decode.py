"""The engine's decode step: one new token per sequence, the model's forward without module dispatch.

On a small model a decode step is mostly overhead: measured on the default model's 30 layers,
nn.Module calls, reshapes and per-call checks cost about as much as streaming the quantized
weights. For steps where every sequence adds one token, this computes what
`LlamaForCausalLM.forward` computes (tests hold it to that, logit for logit) by calling each
submodule's `forward` directly, and the cache's `decode` (paged write + paged attention), on flat
(N, hidden) rows. Hooks mean someone watches the modules: then, and for any model that is not
tuili's Llama, the engine runs the module's forward (which rewrites any keys and values this path
stored before it met the hook with the same values).

Where it applies, the whole step runs as one C++ call instead (tuili.engine.fused, the default);
this Python loop is what it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tuili.engine.fused import fused_decode
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.plan import bf16_step
from tuili.kernels import ops as kernels
from tuili.models.attention import rope_cos_sin
from tuili.models.llama import LlamaForCausalLM, hooked
from tuili.quant.linear import current_compute_dtype, shared_input


def decode_step(
    module: torch.nn.Module, cache: PagedKVCache, ids: Tensor, positions: Tensor, logits_at: Tensor, check: bool = True
) -> Tensor | None:
    """Logits (len(logits_at), V) for token ids (N,) at positions (N,), one per sequence of the
    bound step; None where this path does not apply (the caller runs the module instead).
    `check`: look again whether the model still matches the plan the C++ step made from it; the
    engine asks once per new request, not per token, because with the weights streaming through the
    caches each step the ~400 Python objects that check reads are cold: 0.34 ms of a 4 ms step
    (measured)."""
    if type(module) is not LlamaForCausalLM or torch.is_grad_enabled() or not cache.decoding:
        return None
    bf16 = bf16_step(module.dtype, current_compute_dtype())
    fused = fused_decode(module)
    logits = None if fused is None else fused(cache, ids, positions, logits_at, bf16, check)
    if logits is not None:
        return logits
    backbone = module._modules["model"]  # _modules lookups: nn.Module.__getattr__ costs ~0.5 µs a name
    parts = backbone._modules
    embed, final_norm, head = parts["embed_tokens"], parts["norm"], module._modules["lm_head"]
    if hooked((module, backbone, embed, final_norm, head)):
        return None
    n = ids.shape[0]
    x = embed.forward(ids)  # (N, hidden)
    cos, sin = rope_cos_sin(module.inv_freq, positions[None], x.dtype)  # (1, N, D)
    for layer in parts["layers"]:
        sub = layer._modules
        attn, mlp, norm1, norm2 = sub["self_attn"], sub["mlp"], sub["input_layernorm"], sub["post_attention_layernorm"]
        a, f = attn._modules, mlp._modules
        q_proj, k_proj, v_proj, o_proj = a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"]
        gate_proj, up_proj, down_proj = f["gate_proj"], f["up_proj"], f["down_proj"]
        if hooked((layer, attn, mlp, norm1, norm2, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)):
            return None
        heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        h = norm1.forward(x)
        q, k, v = shared_input((q_proj, k_proj, v_proj), h)
        q = kernels.rope(q.view(1, n, heads, dim), cos, sin)[0]
        k = kernels.rope(k.view(1, n, kv_heads, dim), cos, sin)[0]
        out = cache.decode(attn.layer_idx, q, k, v.view(n, kv_heads, dim))
        x = x + o_proj.forward(out.reshape(n, heads * dim))
        gate, up = shared_input((gate_proj, up_proj), norm2.forward(x))
        x = x + down_proj.forward(F.silu(gate) * up)
    return head.forward(final_norm.forward(x)[logits_at])
