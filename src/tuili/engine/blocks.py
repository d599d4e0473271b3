"""KV-cache blocks: the memory bookkeeping of PagedAttention (vLLM), without the tensors.

The cache is split into fixed-size blocks of `block_size` token slots. A sequence holds a list of
block ids (its block table); token i lives in block `table[i // block_size]` at slot
`i % block_size`, so a sequence never reserves more than one partly filled block: waste is below
one block per sequence whatever the lengths. Blocks carry reference counts so that sequences can
share them (a common prompt prefix, a forked sequence); a shared block is copied before it is
written (copy on write), and a block returns to the free list when its last holder lets go.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocks(RuntimeError):
    """The cache has fewer free blocks than a request needs: the scheduler preempts or waits."""


class BlockAllocator:
    """Hands out block ids 0 … num_blocks − 1 and counts who holds each."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self) -> int:
        """A free block, now held once."""
        if not self._free:
            raise NoFreeBlocks(f"all {self.num_blocks} KV blocks are in use")
        block = self._free.popleft()
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """Hold an allocated block once more (a prefix or fork reusing it)."""
        if self._refs[block] == 0:
            raise ValueError(f"block {block} is free: allocate it before sharing it")
        self._refs[block] += 1
        return block

    def free(self, block: int) -> None:
        """Let go of one hold; the block is free again when nobody holds it."""
        if self._refs[block] == 0:
            raise ValueError(f"block {block} is already free (double free)")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)


class BlockTable:
    """The blocks of one sequence, grown as its tokens arrive."""

    def __init__(self, allocator: BlockAllocator, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.allocator, self.block_size = allocator, block_size
        self.blocks: list[int] = []
        self.num_tokens = 0

    def blocks_needed(self, num_tokens: int) -> int:
        """New blocks that appending up to `num_tokens` in all would take (copy on write included)."""
        grow = max(0, -(-num_tokens // self.block_size) - len(self.blocks))
        return grow + int(self._last_shared_and_partial() and num_tokens > self.num_tokens)

    def append(self, num_tokens: int) -> list[tuple[int, int]]:
        """Make room for tokens up to `num_tokens` in all. Returns the (source, destination) block
        copies the cache must make first (a shared, partly filled last block is copied before it is
        written). Raises NoFreeBlocks, changing nothing, if the cache cannot hold them."""
        if num_tokens <= self.num_tokens:
            return []
        if self.blocks_needed(num_tokens) > self.allocator.num_free:
            raise NoFreeBlocks(f"{self.blocks_needed(num_tokens)} blocks needed, {self.allocator.num_free} free")
        copies = []
        if self._last_shared_and_partial():
            old = self.blocks[-1]
            self.blocks[-1] = self.allocator.allocate()
            self.allocator.free(old)
            copies.append((old, self.blocks[-1]))
        while len(self.blocks) * self.block_size < num_tokens:
            self.blocks.append(self.allocator.allocate())
        self.num_tokens = num_tokens
        return copies

    def truncate(self, num_tokens: int) -> None:
        """Keep the slots of the first `num_tokens` tokens; the blocks past them are let go (the
        rejected tokens of a speculative step)."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"cannot keep {num_tokens} of this sequence's {self.num_tokens} tokens")
        keep = -(-num_tokens // self.block_size)
        for block in self.blocks[keep:]:
            self.allocator.free(block)
        del self.blocks[keep:]
        self.num_tokens = num_tokens

    def slots(self, start: int, end: int) -> list[int]:
        """Flat slot ids (block · block_size + offset) of tokens start … end − 1."""
        if not 0 <= start <= end <= self.num_tokens:
            raise ValueError(f"tokens {start}..{end} are outside this sequence's {self.num_tokens}")
        size = self.block_size
        return [self.blocks[i // size] * size + i % size for i in range(start, end)]

    def fork(self) -> BlockTable:
        """A second sequence with the same tokens, sharing every block until one of them writes."""
        twin = BlockTable(self.allocator, self.block_size)
        twin.blocks = [self.allocator.share(b) for b in self.blocks]
        twin.num_tokens = self.num_tokens
        return twin

    def free(self) -> None:
        """Release every block (a finished, cancelled or preempted sequence)."""
        for block in self.blocks:
            self.allocator.free(block)
        self.blocks, self.num_tokens = [], 0

    def _last_shared_and_partial(self) -> bool:
        return (
            bool(self.blocks)
            and self.num_tokens % self.block_size != 0
            and self.allocator.refcount(self.blocks[-1]) > 1
        )


def unused_fraction(tables: list[BlockTable]) -> float:
    """Allocated-but-unused share of the slots the tables hold (vLLM reports under 4% for paging;
    a contiguous cache sized to the longest request wastes the gap of every shorter one)."""
    allocated = sum(len(t.blocks) * t.block_size for t in tables)
    used = sum(t.num_tokens for t in tables)
    return 1 - used / allocated if allocated else 0.0
