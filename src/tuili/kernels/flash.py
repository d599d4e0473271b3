"""FlashAttention (Dao et al., arXiv:2205.14135) in plain PyTorch: the readable reference.

Attention is computed block by block with an online softmax, so the (T × S) score matrix never
exists: for each block of queries, walk the blocks of keys keeping a running max m, normaliser l
and unnormalised output o:
    s = q·kᵀ·scale,  m' = max(m, rowmax s),  p = e^(s − m'),
    l' = l·e^(m − m') + rowsum p,  o' = o·e^(m − m') + p·v,  and finally o / l.
Memory is O(T·D + block_q·block_k) instead of O(T·S). The engine's production paths are SDPA's
CPU flash kernel (prefill) and tuili's paged-attention kernel (decode); the paged kernel and its
twin are checked against this (tests/kernels/test_attention.py), and it is what the user's notes on
FlashAttention describe.
"""

from __future__ import annotations

import torch
from torch import Tensor


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    block_q: int = 64,
    block_k: int = 64,
    key_lengths: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q·kᵀ·scale + mask)·v for q (B, H, T, D) and k, v (B, Hkv, S, D), H a multiple of Hkv (GQA).

    Queries are the last T of the S positions (T = S for prefill, T < S when a cache holds the
    start). `causal` hides keys after each query; `key_lengths` (B,) hides keys at or past each
    sequence's length (ragged batches padded to S). Returns (B, H, T, D) in q's dtype.
    """
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got {block_q} and {block_k}")
    scale = d**-0.5 if scale is None else scale
    group = h // hkv
    qg = q.reshape(b, hkv, group, t, d).float() * scale  # query heads grouped under their KV head
    out = torch.empty(b, hkv, group, t, d)
    k_len = key_lengths.view(b, 1, 1, 1, 1) if key_lengths is not None else None
    for i0 in range(0, t, block_q):
        i1 = min(t, i0 + block_q)
        q_pos = torch.arange(i0, i1) + (s - t)  # absolute positions of this block's queries
        m = torch.full((b, hkv, group, i1 - i0), -torch.inf)
        total = torch.zeros(b, hkv, group, i1 - i0)
        o = torch.zeros(b, hkv, group, i1 - i0, d)
        for j0 in range(0, s, block_k):
            if causal and j0 > q_pos[-1]:
                break  # every later key is in the future of every query of this block
            j1 = min(s, j0 + block_k)
            scores = torch.einsum("bhgqd,bhkd->bhgqk", qg[:, :, :, i0:i1], k[:, :, j0:j1].float())
            k_pos = torch.arange(j0, j1)
            hidden = torch.zeros(1, 1, 1, i1 - i0, j1 - j0, dtype=torch.bool)
            if causal:
                hidden = hidden | (k_pos[None, :] > q_pos[:, None])
            if k_len is not None:
                hidden = hidden | (k_pos >= k_len)
            scores = scores.masked_fill(hidden, -torch.inf)
            m_new = torch.maximum(m, scores.amax(-1))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing seen yet
            p = torch.exp(scores - safe[..., None])
            correction = torch.exp(m - safe)
            total = total * correction + p.sum(-1)
            o = o * correction[..., None] + torch.einsum("bhgqk,bhkd->bhgqd", p, v[:, :, j0:j1].float())
            m = m_new
        out[:, :, :, i0:i1] = o / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    return out.reshape(b, h, t, d).to(q.dtype)
