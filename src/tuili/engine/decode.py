"""The engine's decode step: one new token per sequence, the model's forward without module dispatch.

On a small model a decode step is mostly overhead: measured on the default model's 30 layers,
nn.Module calls, reshapes and per-call checks cost about as much as streaming the quantized
weights. For steps where every sequence adds one token, this computes what
`LlamaForCausalLM.forward` computes (tests hold it to that, logit for logit) by calling each
submodule's `forward` directly, the fused q/k/v and gate/up projections, and the cache's
`decode` (paged write + paged attention) on flat (N, hidden) rows. Hooks mean someone watches the
modules: then, and for any model that is not tuili's Llama, the engine runs the module's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tuili.engine.paged_cache import PagedKVCache
from tuili.models.attention import rope_cos_sin
from tuili.models.llama import LlamaForCausalLM, hooked, project
from tuili.kernels import ops as kernels


def decode_step(module: torch.nn.Module, cache: PagedKVCache, ids: Tensor, positions: Tensor,
                logits_at: Tensor) -> Tensor | None:
    """Logits (len(logits_at), V) for token ids (N,) at positions (N,), one per sequence of the
    bound step; None where this path does not apply (the caller runs the module instead)."""
    if type(module) is not LlamaForCausalLM or torch.is_grad_enabled() or not cache.decoding:
        return None
    backbone = module.model
    if hooked((module, backbone, backbone.embed_tokens, backbone.norm, module.lm_head)):
        return None
    n = ids.shape[0]
    x = backbone.embed_tokens.forward(ids)  # (N, hidden)
    cos, sin = rope_cos_sin(module.inv_freq, positions[None], x.dtype)  # (1, N, D)
    for layer in backbone.layers:
        attn, mlp, norm1, norm2 = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
        if hooked((layer, attn, mlp, norm1, norm2, attn.o_proj, mlp.down_proj)):
            return None  # project() checks the fused projections' own hooks
        heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q, k, v = project(norm1.forward(x), (attn.q_proj, attn.k_proj, attn.v_proj))
        q = kernels.rope(q.view(1, n, heads, dim), cos, sin)[0]
        k = kernels.rope(k.view(1, n, kv_heads, dim), cos, sin)[0]
        out = cache.decode(attn.layer_idx, q, k, v.view(n, kv_heads, dim))
        x = x + attn.o_proj.forward(out.reshape(n, heads * dim))
        gate, up = project(norm2.forward(x), (mlp.gate_proj, mlp.up_proj))
        x = x + mlp.down_proj.forward(F.silu(gate) * up)
    return module.lm_head.forward(backbone.norm.forward(x)[logits_at])
