"""The paged KV cache: keys and values of many sequences in shared fixed-size blocks.

Storage is one (layers, num_blocks, block_size, Hkv, D) tensor each for keys and values (KV heads,
not query heads: GQA stores 1/group of the keys), in fp32, bf16 or int8 with one scale per token
and head. Before a forward step the caller `bind`s the step's sequences (their block tables, in
batch order); the model then calls `attend` per layer, which writes the step's keys and values
into their slots and attends: decode steps (one token per sequence) run tuili's paged-attention
kernel over the blocks, longer steps gather each sequence's keys and run masked attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tuili.engine.blocks import BlockAllocator, BlockTable
from tuili.kernels import ops as kernels
from tuili.models.attention import attention, causal_mask
from tuili.models.config import LlamaConfig
from tuili.quant.kv import quantize_kv


class PagedKVCache:
    """Blocks for `num_blocks × block_size` tokens, handed to sequences through `new_sequence()`."""

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, kv_int8: bool = False):
        self.config, self.block_size, self.kv_int8 = config, block_size, kv_int8
        shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        store = torch.int8 if kv_int8 else dtype
        self.k, self.v = torch.zeros(shape, dtype=store), torch.zeros(shape, dtype=store)
        self.k_scale = torch.zeros(shape[:-1]) if kv_int8 else None
        self.v_scale = torch.zeros(shape[:-1]) if kv_int8 else None
        self.allocator = BlockAllocator(num_blocks)
        self.scale = config.head_dim ** -0.5
        self._tables: Tensor | None = None

    @classmethod
    def from_budget(cls, config: LlamaConfig, num_bytes: int, block_size: int = 16,
                    dtype: torch.dtype = torch.float32, kv_int8: bool = False) -> PagedKVCache:
        """As many blocks as `num_bytes` of keys, values (and int8 scales) hold."""
        per_token = config.num_hidden_layers * config.num_key_value_heads * (
            2 * config.head_dim * (1 if kv_int8 else torch.empty((), dtype=dtype).element_size())
            + (8 if kv_int8 else 0))
        num_blocks = num_bytes // (per_token * block_size)
        if num_blocks < 1:
            raise ValueError(f"{num_bytes} bytes hold no block of {block_size} tokens "
                             f"({per_token * block_size} bytes each): give the KV cache more memory")
        return cls(config, num_blocks, block_size, dtype, kv_int8)

    @property
    def num_bytes(self) -> int:
        total = 2 * self.k.numel() * self.k.element_size()
        return total + (2 * self.k_scale.numel() * 4 if self.kv_int8 else 0)

    def new_sequence(self) -> BlockTable:
        return BlockTable(self.allocator, self.block_size)

    def bind(self, tables: list[BlockTable]) -> None:
        """The sequences of the next forward step, in batch order (each already `append`ed to hold
        the step's tokens)."""
        width = max(1, max(len(t.blocks) for t in tables))
        self._tables = torch.tensor([t.blocks + [0] * (width - len(t.blocks)) for t in tables], dtype=torch.int32)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply the copy-on-write copies that BlockTable.append returned, in every layer."""
        for src, dst in copies:
            for store in (self.k, self.v, self.k_scale, self.v_scale):
                if store is not None:
                    store[:, dst] = store[:, src]

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Store k, v (B, Hkv, T, D) at `positions` (B, T) in the bound sequences' blocks, then
        attend with q (B, H, T, D) over everything each sequence holds up to its position."""
        tables = self._tables
        if tables is None or tables.shape[0] != q.shape[0]:
            raise RuntimeError("bind() the step's sequences (one block table per batch row) before the forward")
        size = self.block_size
        slots = (tables.long().gather(1, positions // size) * size + positions % size).flatten()  # (B·T,)
        self._write(layer_idx, slots, k, v)
        window = self.config.sliding_window or 0
        if q.shape[2] == 1:
            lens = (positions[:, 0] + 1).to(torch.int32)
            out = kernels.paged_attention(q[:, :, 0], self.k[layer_idx], self.v[layer_idx], tables, lens, self.scale,
                                          self._scale(self.k_scale, layer_idx), self._scale(self.v_scale, layer_idx),
                                          window)
            return out[:, :, None]
        end = int(positions.max()) + 1
        k_pos = torch.arange(end).expand(q.shape[0], end)
        gather = (tables.long().gather(1, (k_pos // size).clamp(max=tables.shape[1] - 1)) * size
                  + k_pos % size)  # (B, S): every sequence's slots for positions 0 … end − 1
        keys = self._read(self.k, self.k_scale, layer_idx, gather, q.dtype)
        values = self._read(self.v, self.v_scale, layer_idx, gather, q.dtype)
        mask = causal_mask(positions, k_pos, window or None)  # also hides slots past a sequence's end
        out, _ = attention(q, keys, values, mask)
        return out

    def _write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        hkv, d = k.shape[1], k.shape[3]
        for store, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            rows = x.transpose(1, 2).reshape(-1, hkv, d)  # (B·T, Hkv, D)
            flat = store[layer].view(-1, hkv, d)
            if scales is None:
                flat[slots] = rows.to(flat.dtype)
            else:
                codes, scale = quantize_kv(rows, "token")  # per token and head: scale over D
                flat[slots] = codes
                scales[layer].view(-1, hkv)[slots] = scale[..., 0]

    @staticmethod
    def _scale(scales: Tensor | None, layer: int) -> Tensor | None:
        return None if scales is None else scales[layer]

    def _read(self, store: Tensor, scales: Tensor | None, layer: int, slots: Tensor, dtype: torch.dtype) -> Tensor:
        hkv, d = store.shape[3], store.shape[4]
        rows = store[layer].view(-1, hkv, d)[slots]  # (B, S, Hkv, D)
        if scales is not None:
            rows = rows.float() * scales[layer].view(-1, hkv)[slots][..., None]
        return rows.to(dtype).transpose(1, 2)  # (B, Hkv, S, D)
