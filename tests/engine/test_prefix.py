"""Prefix caching: a shared prompt prefix is found, reused without recomputation, and evictable."""

import torch
from helpers import random_tiny

from tuili.engine.blocks import BlockAllocator, BlockTable
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.prefix import PrefixCache

SYSTEM = list(range(40, 52))  # 12 tokens: three full blocks of 4


def prefill(module, cache, table, tokens, start):
    """Compute tokens[start:] into the table's blocks; logits of the last token."""
    cache.copy_blocks(table.append(len(tokens)))
    cache.bind([table])
    ids = torch.tensor([tokens[start:]])
    return module(ids, torch.arange(start, len(tokens))[None], cache, last_only=True).logits[0, -1]


@torch.no_grad()
def test_a_second_prompt_reuses_the_shared_prefix_with_identical_logits():
    model = random_tiny("llama-gqa")
    cache = PagedKVCache(model.config, num_blocks=32, block_size=4)
    prefixes = PrefixCache(cache.allocator, 4)
    first = SYSTEM + [7, 8, 9]
    table = prefixes.match(first)
    assert table.num_tokens == 0 and prefixes.hit_rate == 0
    prefill(model.module, cache, table, first, 0)
    prefixes.insert(table, first)

    second = SYSTEM + [100, 101]
    reused = prefixes.match(second)
    assert reused.num_tokens == 12 and reused.blocks == table.blocks[:3]
    assert prefixes.hits == 3 and prefixes.queries == 3 + 3
    logits = prefill(model.module, cache, reused, second, reused.num_tokens)  # only 2 tokens computed
    torch.testing.assert_close(logits, model.module(torch.tensor([second])).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_the_last_prompt_token_is_always_computed():
    allocator = BlockAllocator(8)
    prefixes = PrefixCache(allocator, 4)
    table = BlockTable(allocator, 4)
    table.append(8)
    prefixes.insert(table, list(range(8)))
    assert prefixes.match(list(range(8))).num_tokens == 4  # not 8: the 8th token's logits are needed
    assert prefixes.match(list(range(9))).num_tokens == 8


def test_blocks_outlive_their_sequence_until_evicted():
    allocator = BlockAllocator(4)
    prefixes = PrefixCache(allocator, 4)
    table = BlockTable(allocator, 4)
    table.append(8)
    prefixes.insert(table, list(range(8)))
    table.free()
    assert allocator.num_free == 2  # the index still holds both full blocks
    reused = prefixes.match(list(range(9)))
    assert prefixes.evict(2) == 0  # in use by `reused`: nothing to evict
    reused.free()
    assert prefixes.evict(1) == 1 and allocator.num_free == 3
    assert prefixes.match(list(range(9))).num_tokens == 0  # the chain starts at the evicted block
