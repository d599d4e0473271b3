"""Prefix caching: full KV blocks found again by their content.

A full block is keyed by the hash of its tokens and of the key of the block before it, so a key
names the whole prefix up to the block's end (vLLM's automatic prefix caching). A new prompt walks
its full blocks through the index; each hit is shared into its block table, and those tokens are
not computed again: a repeated system prompt costs nothing after its first request. The index
holds one reference to each block it knows, so blocks outlive their sequences; when memory runs
short, `evict` frees the least recently used blocks that only the index still holds.
"""

from __future__ import annotations

from collections import OrderedDict

from tuili.engine.blocks import BlockAllocator, BlockTable


class PrefixCache:
    def __init__(self, allocator: BlockAllocator, block_size: int):
        self.allocator, self.block_size = allocator, block_size
        self._blocks: OrderedDict[int, int] = OrderedDict()  # key -> block, least recently used first
        self.queries = self.hits = 0  # full prompt blocks looked up, and found

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def _keys(self, tokens: list[int], keys: list[int] | None = None) -> list[int]:
        """The keys of every full block of `tokens`; `keys`, those of a prefix already known, is
        extended in place (a growing sequence hashes each block once)."""
        keys = [] if keys is None else keys
        size = self.block_size
        for i in range(len(keys), len(tokens) // size):
            keys.append(hash((keys[-1] if keys else None, tuple(tokens[i * size : (i + 1) * size]))))
        return keys

    def match(self, prompt: list[int]) -> BlockTable:
        """A block table holding the longest cached prefix of `prompt` (whole blocks, shared), at
        most len(prompt) − 1 tokens so that the last prompt token is always computed (its logits
        start the generation)."""
        table = BlockTable(self.allocator, self.block_size)
        keys = self._keys(prompt[:-1])
        self.queries += len(keys)
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            table.blocks.append(self.allocator.share(block))
            table.num_tokens += self.block_size
            self.hits += 1
        return table

    def insert(self, table: BlockTable, tokens: list[int], keys: list[int] | None = None) -> None:
        """Index the full blocks of a sequence whose KV for `tokens` is now written. Pass the
        sequence's own `keys` list to hash only blocks that filled since the last call."""
        known = 0 if keys is None else len(keys)
        keys = self._keys(tokens[: table.num_tokens], keys)
        for key, block in zip(keys[known:], table.blocks[known:]):
            if key not in self._blocks:
                self._blocks[key] = self.allocator.share(block)

    def num_evictable(self) -> int:
        """Blocks only the index holds: cached for reuse, free the moment room is needed."""
        return sum(1 for block in self._blocks.values() if self.allocator.refcount(block) == 1)

    def evict(self, wanted: int) -> int:
        """Free up to `wanted` blocks that only the index holds, least recently used first."""
        freed = 0
        for key in list(self._blocks):
            if freed == wanted:
                break
            block = self._blocks[key]
            if self.allocator.refcount(block) == 1:
                del self._blocks[key]
                self.allocator.free(block)
                freed += 1
        return freed
