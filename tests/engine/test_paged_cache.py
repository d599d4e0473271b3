"""The paged KV cache: prefill and batched decode of ragged sequences equal full recomputation."""

import pytest
import torch
from helpers import random_tiny, tiny_config

from tuili.engine.paged_cache import PagedKVCache
from tuili.kernels import ops


def run_paged(module, prompts, steps, cache):
    """Prefill each prompt alone, then decode all sequences together for `steps` greedy tokens.
    Returns each sequence's token ids and the logits the cache produced at every step."""
    seqs = [list(p) for p in prompts]
    tables = [cache.new_sequence() for _ in prompts]
    logits = [[] for _ in prompts]
    for i, (seq, table) in enumerate(zip(seqs, tables)):
        cache.copy_blocks(table.append(len(seq)))
        cache.bind([table])
        out = module(torch.tensor([seq]), torch.arange(len(seq))[None], cache, last_only=True).logits[0, -1]
        logits[i].append(out)
        seq.append(int(out.argmax()))
    for _ in range(steps):
        for seq, table in zip(seqs, tables):
            cache.copy_blocks(table.append(len(seq)))
        cache.bind(tables)
        ids = torch.tensor([[s[-1]] for s in seqs])
        positions = torch.tensor([[len(s) - 1] for s in seqs])
        out = module(ids, positions, cache).logits[:, -1]
        for i, seq in enumerate(seqs):
            logits[i].append(out[i])
            seq.append(int(out[i].argmax()))
    return seqs, logits, tables


def recomputed(module, seq, count):
    """Logits at the last `count` prompt-and-generated positions, without any cache."""
    full = module(torch.tensor([seq[:-1]])).logits[0]
    return full[-count:]


@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mqa-tied", "mistral-sliding"])
@pytest.mark.parametrize("path", ["kernels", "fallback"])
@torch.no_grad()
def test_ragged_batched_decode_equals_recomputation(arch, path):
    model = random_tiny(arch)
    cache = PagedKVCache(model.config, num_blocks=32, block_size=4)
    prompts = [[5, 9, 100, 7, 3], list(range(20, 33))]  # 5 and 13 tokens: ragged, partial blocks
    with ops.fallback() if path == "fallback" else torch.no_grad():
        seqs, logits, _ = run_paged(model.module, prompts, 12, cache)
    for seq, got in zip(seqs, logits):
        torch.testing.assert_close(torch.stack(got), recomputed(model.module, seq, len(got)), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_int8_kv_stays_close_to_fp32():
    model = random_tiny("llama-gqa")
    prompts = [[5, 9, 100, 7, 3, 44, 45]]
    seqs, exact, _ = run_paged(model.module, prompts, 8, PagedKVCache(model.config, 16, 4))
    _, approx, _ = run_paged(model.module, [seqs[0][:7]], 8, PagedKVCache(model.config, 16, 4, torch.int8))
    exact, approx = torch.stack(exact[0]), torch.stack(approx[0])
    assert (approx - exact).norm() / exact.norm() < 0.02  # int8 with a scale per token and head


@torch.no_grad()
def test_finished_sequences_give_their_blocks_back():
    model = random_tiny("llama-gqa")
    cache = PagedKVCache(model.config, num_blocks=16, block_size=4)
    _, _, tables = run_paged(model.module, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], 5, cache)
    assert cache.allocator.num_free < 16
    for table in tables:
        table.free()
    assert cache.allocator.num_free == 16


def test_budget_sizes_the_cache_and_refuses_too_little():
    config = tiny_config("llama-gqa")  # 2 layers, 2 KV heads, head_dim 16
    per_block = 2 * 2 * 2 * 16 * 4 * 16  # K and V · layers · heads · dim · fp32 bytes · tokens
    cache = PagedKVCache.from_budget(config, 10 * per_block + 5, block_size=16)
    assert cache.allocator.num_blocks == 10 and cache.num_bytes == 10 * per_block
    with pytest.raises(ValueError, match="give the KV cache more memory"):
        PagedKVCache.from_budget(config, per_block - 1, block_size=16)


@torch.no_grad()
def test_forward_without_bind_is_refused():
    model = random_tiny("llama-gqa")
    cache = PagedKVCache(model.config, num_blocks=4, block_size=4)
    with pytest.raises(RuntimeError, match="bind"):
        model.module(torch.tensor([[1, 2]]), torch.arange(2)[None], cache)


def test_a_decode_step_is_planned_like_any_other_step():
    """bind() works out a step of one token per sequence in plain Python (it runs every token):
    the same slots, lengths and tables as the general plan of the same step."""
    cache = PagedKVCache(tiny_config(), num_blocks=16, block_size=4)
    tables = []
    for length in (3, 8, 1):  # a partly filled block, a full one, a first token
        table = cache.new_sequence()
        table.append(length + 1)
        tables.append(table)
    starts = [3, 8, 1]
    cache.bind(tables, starts, [1, 1, 1])
    fast = cache._step
    general = cache._plan(starts, [1, 1, 1])
    assert fast.slots.dtype == general.slots.dtype and torch.equal(fast.slots, general.slots)
    assert torch.equal(fast.decode_lens, general.decode_lens) and torch.equal(fast.tables, general.tables)
    assert fast.num_decode == general.num_decode == 3 and fast.gathers == general.gathers == []
