"""Rotary position embeddings and causal attention, shared by the model and every KV cache."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuili.models.config import LlamaConfig


class RotaryEmbedding(nn.Module):
    """cos and sin of each position's rotary angles, for the config's RoPE type.

    Most types have one set of frequencies. Two change them with the sequence length, and tuili
    gives each token the frequencies of its own position (so a cached key never changes with the
    batch it was computed in): dynamic NTK rescales the base for positions at or past
    max_position_embeddings, LongRoPE switches from short_factor to long_factor at
    original_max_position_embeddings. transformers does the same when decoding token by token; a
    prompt that crosses the limit in one forward gets the long frequencies there for all its tokens.
    """

    def __init__(self, config: LlamaConfig, local: bool = False):
        """`local`: the default RoPE at config.local_rope_theta (Gemma 3's sliding-window layers)."""
        super().__init__()
        if local:
            assert config.local_rope_theta is not None
            config = dataclasses.replace(config, rope_theta=config.local_rope_theta, rope_scaling=None)
        dim, base, s = config.rotary_dim, config.rope_theta, config.rope_parameters
        self.rope_type = config.rope_type
        self.scaling = _attention_scaling(config)  # on cos and sin: YaRN's and LongRoPE's factor, 1 otherwise
        self.switch = 1 << 62  # the position from which `long_inv_freq` applies
        self.ntk: tuple[float, float, int] | None = None  # dynamic NTK: (factor, base, max_position_embeddings)
        long = None
        if self.rope_type == "longrope":
            exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            inv_freq = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32) * base**exponents)
            long = 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32) * base**exponents)
            self.switch = int(s["original_max_position_embeddings"])
        else:
            inv_freq = _inv_freq(config)
            if self.rope_type == "dynamic":
                self.ntk = (float(s["factor"]), base, config.max_position_embeddings)
                self.switch = config.max_position_embeddings
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("long_inv_freq", long, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin (B, T, D) for positions (B, T), computed in fp32 (angles reach 1e5 radians)."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        if self.rope_type in ("dynamic", "longrope"):  # no branch on the values: exported graphs keep both
            freqs = torch.where(positions[..., None] >= self.switch, self._past_switch(positions), freqs)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(dtype), sin.to(dtype)

    def _past_switch(self, positions: Tensor) -> Tensor:
        """The angles of positions at or past `switch` (B, T, D/2): LongRoPE's long factors, or
        dynamic NTK's base rescaled for a sequence of position + 1 tokens."""
        if self.ntk is None:
            assert self.long_inv_freq is not None
            return positions[..., None].float() * self.long_inv_freq
        factor, base, max_len = self.ntk
        dim = 2 * self.inv_freq.shape[0]
        seq_len = (positions.double() + 1).clamp(min=max_len)
        bases = base * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
        inv_freq = 1.0 / (bases.float()[..., None] ** exponents)
        return positions[..., None].float() * inv_freq


def _inv_freq(config: LlamaConfig) -> Tensor:
    """Inverse frequencies θ_i = base^(-2i/d), rescaled by the config's (static) rope_scaling type."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_parameters
    if config.rope_type == "linear":
        return inv_freq / scaling["factor"]
    if config.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if config.rope_type == "yarn":
        return _yarn_inv_freq(config.rope_theta, dim, scaling)
    return inv_freq


def _attention_scaling(config: LlamaConfig) -> float:
    """The factor YaRN and LongRoPE multiply cos and sin by (1 for every other RoPE type)."""
    s = config.rope_parameters
    if config.rope_type not in ("yarn", "longrope"):
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    if config.rope_type == "longrope":
        original = s["original_max_position_embeddings"]
        factor = s.get("factor") or config.max_position_embeddings / original
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    factor, mscale, mscale_all_dim = s["factor"], s.get("mscale"), s.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(base: float, dim: int, s: dict) -> Tensor:
    """YaRN (arXiv:2309.00071): high frequencies kept, low ones divided by `factor`, a linear ramp
    between the dimensions that turn beta_fast and beta_slow times over the original context."""
    factor, original = s["factor"], s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dimension(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # the share of each dimension kept as it was
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _llama3_inv_freq(inv_freq: Tensor, s: dict) -> Tensor:
    """Llama 3.1 scaling: low frequencies divided by `factor`, high kept, a smooth ramp between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """cap · tanh(x / cap): Gemma 2's soft-capping of attention scores and logits (x for None or 0)."""
    return torch.tanh(x / cap) * cap if cap else x


def scale_embeddings(x: Tensor, scale: float | None) -> Tensor:
    """Embeddings times `scale` in their own dtype (Gemma's √hidden), x for None."""
    return x if scale is None else x * torch.tensor(scale, dtype=x.dtype)


def as_cached(x: Tensor, kv_dtype: str) -> Tensor:
    """Keys or values (…, H, T, D) as a KV cache storing `kv_dtype` hands them back: rounded to
    bf16, or int8 codes with one scale per token and head (tuili.kernels.kv_format). Evaluation without a
    cache runs through this, so a model's perplexity includes what its cache format costs. Under
    autograd the rounding passes gradients straight through (training stays possible)."""
    if kv_dtype == "int8":
        from tuili.kernels.kv_format import dequantize_kv, quantize_kv  # the engine's cache format

        rounded = dequantize_kv(*quantize_kv(x.detach(), "token", check=False), x.dtype)
    else:
        rounded = x.detach().to(getattr(torch, kv_dtype)).to(x.dtype)
    return x + (rounded - x).detach() if x.requires_grad else rounded


def causal_mask(q_pos: Tensor, k_pos: Tensor, sliding_window: int | None) -> Tensor:
    """Boolean (B, 1, T, S): query at position p sees key at position j iff j ≤ p (and p − j < window)."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    visible = k <= q
    if sliding_window is not None:
        visible &= k > q - sliding_window
    return visible[:, None]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    is_causal: bool = False,
    return_probs: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """softmax(q kᵀ · scale + mask) v for q (B, H, T, D) and k, v (B, Hkv, S, D); GQA by head
    groups. scale: 1/√D by default; softcap: scores become softcap · tanh(score / softcap) (Gemma 2).

    With `return_probs` or `softcap` the probabilities are materialised (eager path, softmax in
    fp32; distillation reads them); otherwise PyTorch's fused SDPA kernel runs.
    """
    if not return_probs and not softcap:
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            enable_gqa=k.shape[1] != q.shape[1],
            scale=scale,
        )
        return out, None
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * (scale or q.shape[-1] ** -0.5)  # (B, H, T, S)
    scores = soft_cap(scores, softcap)
    if mask is None and is_causal:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return probs @ v, probs
