"""The paged KV cache: keys and values of many sequences in shared fixed-size blocks.

Storage is one (layers, num_blocks, block_size, Hkv, D) tensor each for keys and values (KV heads,
not query heads: GQA stores 1/group of the keys), in fp32, bf16 or int8 with one scale per token
and head. Before a forward step the caller `bind`s the step's sequences (their block tables); the
model then calls `attend` per layer, which writes the step's keys and values into their slots and
attends. A step is a list of segments, a run of consecutive tokens of one sequence each: the
engine packs every segment into one row (1, N) so that each weight is read once per step (vLLM's
layout), and a plain (B, T) batch is B segments of T tokens. Leading one-token segments (decodes)
run tuili's paged-attention kernel over the blocks; longer ones (prefill chunks) gather their
sequence's keys and run PyTorch's SDPA with a causal mask offset to the chunk's start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tuili.engine.blocks import BlockAllocator, BlockTable
from tuili.kernels import ops as kernels
from tuili.models.attention import attention, causal_mask
from tuili.models.config import LlamaConfig

STORE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # what tuili's kernels read and write


@dataclass
class _Step:
    """Where a step's tokens go and what they see, worked out once per step for every layer."""

    tables: Tensor  # (S, W) int32 block ids per segment, padded with 0
    starts: list[int]  # position of each segment's first token
    lengths: list[int]  # tokens per segment
    slots: Tensor  # (N,) flat slot of every token, in packed order
    num_decode: int  # leading one-token segments, attended by the paged kernel
    decode_lens: Tensor  # (num_decode,) int32 context length of each of them
    gathers: list[Tensor]  # per later segment: the slots of its positions 0 … end − 1


class PagedKVCache:
    """Blocks for `num_blocks × block_size` tokens, handed to sequences through `new_sequence()`.

    `dtype`: what the blocks store, float32, bfloat16 or int8 (codes, plus one fp32 scale per
    token and head: tuili.kernels.kv_format)."""

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.float32):
        if dtype not in STORE_DTYPES:
            raise ValueError(
                f"a KV cache stores {', '.join(str(d).removeprefix('torch.') for d in STORE_DTYPES)}; got {dtype}"
            )
        self.config, self.block_size, self.dtype = config, block_size, dtype
        self.kv_int8 = dtype == torch.int8
        shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.k, self.v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        self.k_scale = torch.zeros(shape[:-1]) if self.kv_int8 else None
        self.v_scale = torch.zeros(shape[:-1]) if self.kv_int8 else None
        self.allocator = BlockAllocator(num_blocks)
        self.scale = config.attention_scale
        self._tables: Tensor | None = None
        self._step: _Step | None = None

    @staticmethod
    def dtype_for(config: LlamaConfig, model_dtype: torch.dtype, requested: str | None = None) -> torch.dtype:
        """What a cache for this model stores: `requested` ("float32", "bfloat16", "int8"; None or
        "auto": the model's `kv_cache_dtype`, set by tuili.quant.quantize_kv_cache_, else its dtype)."""
        name = config.kv_cache_dtype if requested in (None, "auto") else requested
        if name is None:
            return model_dtype if model_dtype in STORE_DTYPES else torch.float32
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if dtype not in STORE_DTYPES:
            raise ValueError(
                f"unknown KV cache dtype {name!r}: choose auto, "
                f"{', '.join(str(d).removeprefix('torch.') for d in STORE_DTYPES)}"
            )
        return dtype

    @staticmethod
    def bytes_per_token(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> int:
        """Keys and values of one token in every layer (and their int8 scales)."""
        int8 = dtype == torch.int8
        return (
            config.num_hidden_layers
            * config.num_key_value_heads
            * (2 * config.head_dim * dtype.itemsize + (8 if int8 else 0))
        )

    @classmethod
    def bytes_per_token_of(cls, model, requested: str | None = None) -> int:
        """`bytes_per_token` of the cache an engine makes for `model` (a Model) by default."""
        return cls.bytes_per_token(model.config, cls.dtype_for(model.config, model.module.dtype, requested))

    @classmethod
    def from_budget(
        cls, config: LlamaConfig, num_bytes: int, block_size: int = 16, dtype: torch.dtype = torch.float32
    ) -> PagedKVCache:
        """As many blocks as `num_bytes` of keys, values (and int8 scales) hold."""
        per_block = cls.bytes_per_token(config, dtype) * block_size
        num_blocks = num_bytes // per_block
        if num_blocks < 1:
            raise ValueError(
                f"{num_bytes} bytes hold no block of {block_size} tokens "
                f"({per_block} bytes each): give the KV cache more memory"
            )
        return cls(config, num_blocks, block_size, dtype)

    @property
    def num_bytes(self) -> int:
        total = 2 * self.k.numel() * self.k.element_size()
        return total + (2 * self.k_scale.numel() * 4 if self.k_scale is not None else 0)

    def new_sequence(self) -> BlockTable:
        return BlockTable(self.allocator, self.block_size)

    def bind(self, tables: list[BlockTable], starts: list[int] | None = None, lengths: list[int] | None = None) -> None:
        """The sequences of the next forward step (each already `append`ed to hold the step's tokens).

        With `starts` and `lengths` the step is packed: the model gets one row (1, N) holding
        lengths[i] tokens of sequence i from position starts[i], segment after segment. Without
        them, the forward is a (B, T) batch, row i belonging to tables[i].
        """
        width = max(1, max(len(t.blocks) for t in tables))
        self._tables = torch.tensor([t.blocks + [0] * (width - len(t.blocks)) for t in tables], dtype=torch.int32)
        if starts is not None and lengths is None:
            raise ValueError("bind() needs one length per start")
        self._step = None if starts is None else self._plan(starts, lengths or [], tables)

    def _plan(self, starts: list[int], lengths: list[int], block_tables: list[BlockTable] | None = None) -> _Step:
        tables, size = self._tables, self.block_size
        if tables is None:
            raise RuntimeError("bind() the step's sequences before planning it")
        if len(starts) != tables.shape[0] or len(lengths) != len(starts):
            raise ValueError("bind() needs one start and one length per block table")
        if block_tables is not None and all(n == 1 for n in lengths):  # a decode step: every token's slot in Python
            slots = [slot for t, s in zip(block_tables, starts) for slot in t.slots(s, s + 1)]
            return _Step(
                tables,
                list(starts),
                list(lengths),
                torch.tensor(slots),
                len(starts),
                torch.tensor([s + 1 for s in starts], dtype=torch.int32),
                [],
            )
        seg = torch.repeat_interleave(torch.arange(len(starts)), torch.tensor(lengths))
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
        flat = tables.long()[seg, pos // size] * size + pos % size
        num_decode = next((i for i, n in enumerate(lengths) if n != 1), len(lengths))
        decode_lens = torch.tensor(starts[:num_decode], dtype=torch.int32) + 1
        gathers = []
        for i in range(num_decode, len(starts)):
            k_pos = torch.arange(starts[i] + lengths[i])
            gathers.append(tables[i].long()[k_pos // size] * size + k_pos % size)
        return _Step(tables, list(starts), list(lengths), flat, num_decode, decode_lens, gathers)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply the copy-on-write copies that BlockTable.append returned, in every layer."""
        for src, dst in copies:
            for store in (self.k, self.v, self.k_scale, self.v_scale):
                if store is not None:
                    store[:, dst] = store[:, src]

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Store k, v (B, Hkv, T, D) at `positions` (B, T) in the bound sequences' blocks, then
        attend with q (B, H, T, D) over everything each sequence holds up to its position."""
        if self._tables is None:
            raise RuntimeError("bind() the step's sequences before the forward")
        b, h, t, d = q.shape
        step = self._step
        if step is None:  # a (B, T) batch: B segments of T tokens
            if self._tables.shape[0] != b:
                raise RuntimeError("bind() one block table per batch row before the forward")
            step = self._plan(positions[:, 0].tolist(), [t] * b)
            q, k, v = (x.transpose(0, 1).reshape(1, x.shape[1], b * t, d) for x in (q, k, v))
        elif b != 1 or t != len(step.slots):
            raise RuntimeError(f"the bound step packs {len(step.slots)} tokens in one row; got a ({b}, {t}) batch")
        self._write(layer_idx, step.slots, k, v)
        out = self._attend_segments(layer_idx, q, step)
        if self._step is None:
            out = out.reshape(h, b, t, d).transpose(0, 1)
        return out

    def _attend_segments(self, layer: int, q: Tensor, step: _Step) -> Tensor:
        """q (1, H, N) packed segments -> (1, H, N, D): decodes through the paged kernel, longer
        segments through SDPA over their gathered keys."""
        window = self.config.layer_window(layer) or 0
        softcap = self.config.attn_softcap
        outs = []
        nd = step.num_decode
        if nd:
            outs.append(self._paged(layer, q[0, :, :nd].transpose(0, 1), step).transpose(0, 1)[None])  # (1, H, nd, D)
        offset = nd
        for i, gather in enumerate(step.gathers, start=nd):
            start, n = step.starts[i], step.lengths[i]
            keys = self._read(self.k, self.k_scale, layer, gather[None], q.dtype)
            values = self._read(self.v, self.v_scale, layer, gather[None], q.dtype)
            q_seg = q[:, :, offset : offset + n]
            if start == 0 and not (window and n > window):
                out, _ = attention(q_seg, keys, values, None, n > 1, False, self.scale, softcap)
            else:
                q_pos = torch.arange(start, start + n)[None]
                mask = causal_mask(q_pos, torch.arange(start + n)[None], window or None)
                out, _ = attention(q_seg, keys, values, mask, False, False, self.scale, softcap)
            outs.append(out)
            offset += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _paged(self, layer: int, q: Tensor, step: _Step) -> Tensor:
        """The paged-attention kernel for the step's leading one-token segments, q (nd, H, D)."""
        nd = step.num_decode
        return kernels.paged_attention(
            q,
            self.k[layer],
            self.v[layer],
            step.tables[:nd],
            step.decode_lens,
            self.scale,
            self._scale(self.k_scale, layer),
            self._scale(self.v_scale, layer),
            self.config.layer_window(layer) or 0,
            self.config.attn_softcap or 0.0,
        )

    @property
    def decoding(self) -> bool:
        """The bound step is packed and holds one token per sequence."""
        return self._step is not None and self._step.num_decode == len(self._step.starts)

    def _write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """k, v (1, Hkv, N, D) packed rows into their slots (one kernel call for both)."""
        kernels.paged_write(
            self.k[layer],
            self.v[layer],
            slots,
            k[0].transpose(0, 1),
            v[0].transpose(0, 1),
            self._scale(self.k_scale, layer),
            self._scale(self.v_scale, layer),
        )

    @staticmethod
    def _scale(scales: Tensor | None, layer: int) -> Tensor | None:
        return None if scales is None else scales[layer]

    def _read(self, store: Tensor, scales: Tensor | None, layer: int, slots: Tensor, dtype: torch.dtype) -> Tensor:
        hkv, d = store.shape[3], store.shape[4]
        rows = store[layer].view(-1, hkv, d)[slots]  # (B, S, Hkv, D)
        if scales is not None:
            rows = rows.float() * scales[layer].view(-1, hkv)[slots][..., None]
        return rows.to(dtype).transpose(1, 2)  # (B, Hkv, S, D)
