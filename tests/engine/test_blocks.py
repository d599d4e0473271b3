"""KV-block bookkeeping: allocation, sharing, copy on write, and no leaks under random workloads."""

import random
from collections import Counter

import pytest

from tuili.engine.blocks import BlockAllocator, BlockTable, NoFreeBlocks


def test_tokens_map_to_slots_through_the_table():
    table = BlockTable(BlockAllocator(8), block_size=4)
    table.append(6)
    a, b = table.blocks
    assert table.slots(0, 6) == [a * 4, a * 4 + 1, a * 4 + 2, a * 4 + 3, b * 4, b * 4 + 1]
    with pytest.raises(ValueError, match="outside"):
        table.slots(5, 7)


def test_a_sequence_holds_at_most_one_partial_block():
    allocator = BlockAllocator(100)
    for n in (1, 16, 17, 250, 256):
        table = BlockTable(allocator, 16)
        table.append(n)
        assert len(table.blocks) == -(-n // 16)
        table.free()
    assert allocator.num_free == 100


def test_running_out_changes_nothing():
    allocator = BlockAllocator(3)
    table = BlockTable(allocator, 4)
    table.append(8)
    with pytest.raises(NoFreeBlocks):
        table.append(13)  # needs 2 more blocks, 1 free
    assert table.num_tokens == 8 and len(table.blocks) == 2 and allocator.num_free == 1


def test_fork_shares_and_copies_the_partial_block_on_write():
    allocator = BlockAllocator(10)
    parent = BlockTable(allocator, 4)
    parent.append(6)  # one full block, one holding 2 tokens
    child = parent.fork()
    assert child.blocks == parent.blocks and all(allocator.refcount(b) == 2 for b in parent.blocks)
    copies = child.append(7)
    assert copies == [(parent.blocks[1], child.blocks[1])]
    assert child.blocks[0] == parent.blocks[0] and child.blocks[1] != parent.blocks[1]
    assert allocator.refcount(parent.blocks[0]) == 2 and allocator.refcount(parent.blocks[1]) == 1
    assert parent.append(7) == []  # the parent now owns its partial block alone


def test_double_free_and_sharing_a_free_block_are_refused():
    allocator = BlockAllocator(2)
    block = allocator.allocate()
    allocator.free(block)
    with pytest.raises(ValueError, match="double free"):
        allocator.free(block)
    with pytest.raises(ValueError, match="is free"):
        allocator.share(block)


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_keeps_every_invariant(seed):
    """Allocate, grow, fork and free at random; after each step the reference counts equal the
    number of tables holding each block, free blocks are exactly those held by nobody, and no block
    is handed out twice. At the end everything is free again."""
    rng = random.Random(seed)
    allocator = BlockAllocator(64)
    tables: list[BlockTable] = []
    for _ in range(2000):
        op = rng.random()
        try:
            if op < 0.35 or not tables:
                table = BlockTable(allocator, 8)
                table.append(rng.randint(1, 40))
                tables.append(table)
            elif op < 0.7:
                table = rng.choice(tables)
                table.append(table.num_tokens + rng.randint(1, 12))
            elif op < 0.8:
                tables.append(rng.choice(tables).fork())
            else:
                tables.pop(rng.randrange(len(tables))).free()
        except NoFreeBlocks:
            tables.pop(rng.randrange(len(tables))).free()  # what the scheduler does: preempt one
        held = Counter(b for t in tables for b in t.blocks)
        assert all(allocator.refcount(b) == held[b] for b in range(64))
        assert allocator.num_free == sum(1 for b in range(64) if held[b] == 0)
        for t in tables:
            assert len(t.blocks) == -(-t.num_tokens // 8)
            assert len(set(t.blocks)) == len(t.blocks)
    for table in tables:
        table.free()
    assert allocator.num_free == 64


def test_ragged_workload_wastes_under_4_percent_of_allocated_slots():
    """The engine's memory figure: 64 requests of 256 to 2,048 tokens in blocks of 16 slots."""
    from tuili.engine.blocks import unused_fraction

    rng = random.Random(0)
    lengths = [rng.randint(256, 2048) for _ in range(64)]
    allocator = BlockAllocator(sum(-(-n // 16) for n in lengths))
    tables = []
    for n in lengths:
        tables.append(BlockTable(allocator, 16))
        tables[-1].append(n)
    paged = unused_fraction(tables)
    contiguous = 1 - sum(lengths) / (len(lengths) * max(lengths))  # one max-length buffer per request
    assert paged < 0.04 and contiguous > 0.3
    assert paged == pytest.approx(1 - sum(lengths) / (16 * sum(-(-n // 16) for n in lengths)))
