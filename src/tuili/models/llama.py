"""tuili's Llama-family decoder (Llama, SmolLM, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and 3) in plain PyTorch.

Module names equal the Hugging Face ones (`model.layers.0.self_attn.q_proj`), so a state dict
moves between tuili and transformers unchanged and compression sees ordinary `nn.Linear`s.
The forward takes token ids, positions and an optional KV cache, so the engine can drive it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuili.kernels import ops as kernels
from tuili.kernels.contract import KernelCall
from tuili.models.attention import (
    RotaryEmbedding,
    as_cached,
    attention,
    causal_mask,
    scale_embeddings,
    soft_cap,
)
from tuili.models.config import LlamaConfig

if TYPE_CHECKING:
    from tuili.models.lazy import LazyLayers


class KVCache(Protocol):
    """What the model needs of a KV cache: store this step's keys and values, attend over all."""

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q (B, H, T, D), new k and v (B, Hkv, T, D) at `positions` (B, T) -> output (B, H, T, D)."""
        ...


@dataclass
class CausalLMOutput:
    logits: Tensor  # (B, T, V), or (B, 1, V) with last_only
    hidden_states: tuple[Tensor, ...] | None = None  # embeddings, each layer's output (last normed)
    attentions: tuple[Tensor, ...] | None = None  # per layer (B, H, T, S) probabilities


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · w, computed in fp32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)  # one fused pass on CPU, PyTorch elsewhere


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that decodes through tuili's fp32 GEMV kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return kernels.linear(x, self.weight, self.bias)

    def kernel_call(self, bf16: bool = False) -> KernelCall:
        """This layer's forward as one kernel call (for the engine's C++ decode step); the same
        for any activations."""
        return KernelCall.of("linear", self.weight, self.bias, ints=(kernels.f32_gemv_rows(),))


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.config = config  # shared with the model: its kv_cache_dtype says how keys are stored
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads, d)
        self.sliding_window = config.layer_window(layer_idx)
        self.local_rope = config.local_rope_theta is not None and self.sliding_window is not None
        self.scale, self.softcap = config.attention_scale, config.attn_softcap
        bias = config.attention_bias
        self.q_proj = Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = Linear(self.num_heads * d, h, bias=config.o_proj_bias)
        # Qwen3, Gemma 3: an RMSNorm over each head's q and k, before RoPE
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, return_probs: bool
    ) -> tuple[Tensor, Tensor | None]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = kernels.rope(q, cos, sin).transpose(1, 2)
        k = kernels.rope(k, cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        probs = None
        if cache is not None:
            if return_probs:
                raise ValueError("attention probabilities are only returned without a KV cache")
            out = cache.attend(self.layer_idx, q, k, v, positions)
        else:
            kv_dtype = self.config.kv_cache_dtype
            if kv_dtype is not None:  # what a cache of that dtype would hand back
                k, v = as_cached(k, kv_dtype), as_cached(v, kv_dtype)
            window = self.sliding_window
            # built whatever t is: a branch on t would be frozen into an exported graph
            mask = causal_mask(positions, positions, window) if window else None
            out, probs = attention(q, k, v, mask, t > 1, return_probs, self.scale, self.softcap)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), probs


ACTIVATIONS = {  # config.hidden_act -> the function (transformers' ACT2FN names)
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
# act(gate) · up written over gate: under no_grad the MLP's big temporaries are not allocated again
ACT_MUL_ = {
    "silu": kernels.silu_mul_,
    "gelu": lambda gate, up: torch.ops.aten.gelu_(gate).mul_(up),
    "gelu_pytorch_tanh": lambda gate, up: torch.ops.aten.gelu_(gate, approximate="tanh").mul_(up),
    "relu": lambda gate, up: F.relu(gate, inplace=True).mul_(up),
}


class MLP(nn.Module):
    """Gated: down(act(gate(x)) · up(x)); SwiGLU with the default SiLU."""

    def __init__(self, config: LlamaConfig, intermediate_size: int | None = None):
        super().__init__()
        self.activation = config.hidden_act  # the name the engine's C++ decode step knows it by too
        self.act, self.act_mul_ = ACTIVATIONS[config.hidden_act], ACT_MUL_[config.hidden_act]
        h, i, bias = config.hidden_size, intermediate_size or config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        if torch.is_grad_enabled() or type(gate) is not Tensor:  # autograd keeps the inputs; subclasses: as they are
            return self.down_proj(self.act(gate) * self.up_proj(x))
        # a 512-token prefill's gate is tens of MB: new tensors for act and product cost page faults
        return self.down_proj(self.act_mul_(gate, self.up_proj(x)))


class SparseMoE(nn.Module):
    """A top-k mixture of experts (Qwen3-MoE, Mixtral): the router (`gate`) scores every expert for
    each token, the experts_per_token best run (softmax in fp32, their weights renormalized where the
    config says) and the token's output is their weighted sum. Experts are ordinary gated MLPs of
    nn.Linear layers, so quantization, pruning and tuili's kernels treat them as any other layer."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.top_k, self.normalize = config.experts_per_token, config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config, config.expert_intermediate_size) for _ in range(config.num_experts))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's chosen experts (N, k) and their weights (N, k), in the input's dtype."""
        return self.choose(self.gate(x))

    def choose(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The router's choice from its logits (N, experts)."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights.to(logits.dtype)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        chosen, weights = self.route(rows)
        out = torch.zeros_like(rows)
        if torch.compiler.is_exporting():  # no data-dependent loop in a graph: every expert, weight 0 if not chosen
            for e, expert in enumerate(self.experts):
                w = (weights * (chosen == e)).sum(dim=-1, keepdim=True)
                out = out + (expert(rows) * w).to(out.dtype)
            return out.view(x.shape)
        for e in chosen.unique().tolist():  # the experts some row chose, in order
            token, slot = torch.where(chosen == e)
            y = self.experts[e](rows[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(x.shape)


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)); Gemma also norms each output before adding it."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx)
        self.mlp: nn.Module = SparseMoE(config) if config.sparse_layer(layer_idx) else MLP(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)  # before the MLP (Llama's name)
        self.attn_output_norm = RMSNorm(h, eps) if config.output_norms else None
        self.mlp_output_norm = RMSNorm(h, eps) if config.output_norms else None

    def forward(self, x, positions, cos, sin, cache, return_probs):
        attn_out, probs = self.self_attn(self.input_layernorm(x), positions, cos, sin, cache, return_probs)
        if self.attn_output_norm is not None:
            attn_out = self.attn_output_norm(attn_out)
        x = x + attn_out
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        if self.mlp_output_norm is not None:
            mlp_out = self.mlp_output_norm(mlp_out)
        return x + mlp_out, probs


class LlamaBackbone(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder plus its language-model head; `forward` returns a `CausalLMOutput`."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(config)  # buffers only: nothing in the state dict
        # Gemma 3's sliding-window layers: a RoPE of their own
        self.rotary_emb_local = RotaryEmbedding(config, local=True) if config.local_rope_theta else None
        self.lazy_layers: LazyLayers | None = None  # decoder layers still on disk (tuili.models.lazy)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
        logits_at: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> CausalLMOutput:
        """Logits for token ids (B, T) at `positions` (B, T; default 0..T-1).

        Without a cache the T tokens attend causally to each other; with one, they also see what
        the cache holds. `last_only` computes the head for the last position only (decoding);
        `logits_at` (indices along T) for those positions only (the engine's packed steps).
        """
        hidden, probs_all = [], []
        x = self.final_hidden(
            input_ids,
            positions,
            cache,
            hidden if output_hidden_states else None,
            probs_all if output_attentions else None,
        )
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[:, logits_at]
        return CausalLMOutput(
            logits=self.logits(x),
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(probs_all) if output_attentions else None,
        )

    def logits(self, x: Tensor) -> Tensor:
        """The head on final hidden states, soft-capped where the config says (Gemma 2)."""
        return soft_cap(self.lm_head(x), self.config.final_softcap)

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings, scaled where the config says (Gemma: by √hidden in the model's dtype)."""
        return scale_embeddings(self.model.embed_tokens(input_ids), self.config.embed_scale)

    def final_hidden(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        hidden: list[Tensor] | None = None,
        attentions: list[Tensor] | None = None,
    ) -> Tensor:
        """The final normed hidden states (B, T, hidden) before the head (what embeddings pool);
        each layer's input and the normed output are appended to `hidden`, attention
        probabilities to `attentions`, when given."""
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.embed(input_ids)
        rope = self.rotary_emb(positions, x.dtype)
        local = rope if self.rotary_emb_local is None else self.rotary_emb_local(positions, x.dtype)
        for layer in self.model.layers:
            if hidden is not None:
                hidden.append(x)
            cos, sin = local if layer.self_attn.local_rope else rope
            x, probs = layer(x, positions, cos, sin, cache, attentions is not None)
            if attentions is not None:
                attentions.append(probs)
        x = self.model.norm(x)
        if hidden is not None:
            hidden.append(x)
        return x

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device
