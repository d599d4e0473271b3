"""A contiguous KV cache: one (B, Hkv, S_max, D) buffer per layer, slot = position.

The simple cache for single-stream generation; the engine's paged cache implements the same
`attend` contract for many sequences of different lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tuili.models.attention import attention, causal_mask
from tuili.models.config import LlamaConfig


class ContiguousKVCache:
    """Keys and values of `batch_size` sequences, each up to `max_len` tokens (KV heads, not query heads)."""

    def __init__(
        self,
        config: LlamaConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.config = config

    @property
    def num_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        end = int(positions.max()) + 1
        if end > self.max_len:
            raise ValueError(f"position {end - 1} is past the cache's max_len={self.max_len}")
        rows = torch.arange(q.shape[0], device=q.device)[:, None]  # (B, 1)
        # advanced indices on dims 0 and 2 go first: the target view is (B, T, Hkv, D)
        self.k[layer_idx][rows, :, positions] = k.transpose(1, 2)
        self.v[layer_idx][rows, :, positions] = v.transpose(1, 2)
        keys, values = self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]
        t = q.shape[2]
        config = self.config
        window = config.layer_window(layer_idx)
        if t == 1 and int(positions.min()) == end - 1 and (window is None or end <= window):
            mask = None  # every row's one query sits at the newest position: it sees all keys
        else:
            k_pos = torch.arange(end, device=q.device).expand(q.shape[0], end)
            mask = causal_mask(positions, k_pos, window)
        out, _ = attention(q, keys, values, mask, False, False, config.attention_scale, config.attn_softcap)
        return out
