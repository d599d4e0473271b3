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
    return inv_freq


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


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of position · θ, (B, T, D), computed in fp32 (angles reach 1e5 radians)."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


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
