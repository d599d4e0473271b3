"""Rotary position embeddings and causal attention, shared by the model and every KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tuili.models.config import LlamaConfig


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """Inverse frequencies θ_i = base^(-2i/d), rescaled by the config's rope_scaling type."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        return inv_freq / scaling["factor"]
    if config.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if config.rope_type == "yarn":
        return _yarn_inv_freq(config.rope_theta, dim, scaling)
    return inv_freq


def rope_attention_scaling(config: LlamaConfig) -> float:
    """The factor YaRN multiplies cos and sin by (1 for every other RoPE type)."""
    if config.rope_type != "yarn":
        return 1.0
    s = config.rope_scaling or {}
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
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


def rope_cos_sin(
    inv_freq: Tensor, positions: Tensor, dtype: torch.dtype, scaling: float = 1.0
) -> tuple[Tensor, Tensor]:
    """cos and sin of position · θ, (B, T, D), computed in fp32 (angles reach 1e5 radians), times
    `scaling` (YaRN's attention factor; 1 otherwise)."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.to(dtype), sin.to(dtype)


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
) -> tuple[Tensor, Tensor | None]:
    """softmax(q kᵀ/√d + mask) v for q (B, H, T, D) and k, v (B, Hkv, S, D); GQA by head groups.

    With `return_probs` the probabilities are materialised (eager path, softmax in fp32) so that
    distillation can read them; otherwise PyTorch's fused SDPA kernel runs.
    """
    if not return_probs:
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out, None
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None and is_causal:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return probs @ v, probs
