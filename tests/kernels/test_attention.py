"""Paged decode attention: the C++ kernel against the PyTorch reference, and the reference against
plain attention over a contiguous cache."""

import math

import pytest
import torch

from tuili.kernels import ops
from tuili.kernels.build import extension

ext = extension()
needs_kernels = pytest.mark.skipif(ext is None, reason="C++ kernels not built on this machine")


def paged_cache(lens, kv_heads, dim, block_size, dtype=torch.float32, seed=0):
    """Random K/V for sequences of the given lengths, scattered over shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + 3  # spare blocks nobody owns
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.int32)
    used = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = order[used : used + n]
        used += n
    k = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    v = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    if dtype == torch.int8:
        ks = k.abs().amax(-1) / 127
        vs = v.abs().amax(-1) / 127
        return (
            (k / ks[..., None]).round().to(torch.int8),
            (v / vs[..., None]).round().to(torch.int8),
            tables,
            torch.tensor(lens, dtype=torch.int32),
            ks,
            vs,
        )
    return k.to(dtype), v.to(dtype), tables, torch.tensor(lens, dtype=torch.int32), None, None


def test_reference_equals_attention_over_a_contiguous_cache():
    lens, hq, hkv, d, bs = [5, 17], 6, 2, 8, 4
    k, v, tables, ctx, _, _ = paged_cache(lens, hkv, d, bs)
    q = torch.randn(2, hq, d)
    out = ops.paged_attention_reference(q, k, v, tables, ctx, 1 / math.sqrt(d))
    for b, n in enumerate(lens):
        kb = k[tables[b].long()].reshape(-1, hkv, d)[:n].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        vb = v[tables[b].long()].reshape(-1, hkv, d)[:n].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        expected = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], kb, vb)[:, 0]
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_paged_decode_attention_equals_flash_attention(path):
    """Decode attention over scattered blocks equals FlashAttention's tiled online softmax over the
    same keys and values laid out contiguously (ragged lengths as key_lengths)."""
    from tuili.kernels.flash import flash_attention

    if path == "kernel" and ext is None:
        pytest.skip("C++ kernels not built on this machine")
    lens, hq, hkv, d, bs = [3, 40, 17], 8, 2, 64, 16
    k, v, tables, ctx, _, _ = paged_cache(lens, hkv, d, bs, seed=3)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(4))
    attend = ops.paged_attention if path == "kernel" else ops.paged_attention_reference
    out = attend(q, k, v, tables, ctx, 1 / math.sqrt(d))
    width = max(lens)
    kc = torch.zeros(len(lens), hkv, width, d)
    vc = torch.zeros(len(lens), hkv, width, d)
    for b, n in enumerate(lens):
        kc[b, :, :n] = k[tables[b].long()].reshape(-1, hkv, d)[:n].transpose(0, 1)
        vc[b, :, :n] = v[tables[b].long()].reshape(-1, hkv, d)[:n].transpose(0, 1)
    expected = flash_attention(q[:, :, None], kc, vc, causal=False, key_lengths=ctx.long(), block_k=8)[:, :, 0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize(
    "lens, hq, hkv, d, bs",
    [
        ([1], 9, 3, 64, 16),
        ([37, 5, 200], 9, 3, 64, 16),
        ([33], 4, 4, 32, 8),
        ([129, 64], 8, 1, 128, 32),
        ([7, 8], 6, 2, 20, 3),
        # every value-pass path: all heads in registers (D=64,
        # groups up to 6; D=128 up to 3) and head by head beyond
        ([50, 17], 14, 2, 64, 16),
        ([3, 90], 6, 1, 64, 16),
        ([70], 6, 2, 128, 16),
    ],
)
def test_kernel_matches_reference(dtype, lens, hq, hkv, d, bs):
    k, v, tables, ctx, ks, vs = paged_cache(lens, hkv, d, bs, dtype)
    q = torch.randn(len(lens), hq, d)
    args = (q, k, v, tables, ctx, 1 / math.sqrt(d), ks, vs)
    torch.testing.assert_close(
        ext.paged_attention(*args, 0, 0.0), ops.paged_attention_reference(*args), atol=2e-5, rtol=1e-4
    )


@needs_kernels
@pytest.mark.parametrize("window", [1, 6, 50])
def test_sliding_window_sees_only_the_last_tokens(window):
    k, v, tables, ctx, _, _ = paged_cache([30, 9], 2, 16, 4)
    q = torch.randn(2, 4, 16)
    args = (q, k, v, tables, ctx, 0.25, None, None)
    torch.testing.assert_close(
        ext.paged_attention(*args, window, 0.0), ops.paged_attention_reference(*args, window), atol=2e-5, rtol=1e-4
    )


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("window", [0, 6])
def test_soft_capped_scores_match_the_reference(dtype, window):
    k, v, tables, ctx, ks, vs = paged_cache([30, 9], 2, 16, 4, dtype)
    q = torch.randn(2, 4, 16) * 3  # scores well past the cap, so that tanh bends
    args = (q, k, v, tables, ctx, 0.25, ks, vs, window, 1.5)
    got = ext.paged_attention(*args)
    torch.testing.assert_close(got, ops.paged_attention_reference(*args), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, ops.paged_attention_reference(*args[:-1]), atol=1e-3)
    with pytest.raises(RuntimeError, match="softcap must be"):
        ext.paged_attention(*args[:-1], -1.0)


@needs_kernels
def test_bf16_queries_give_bf16_output():
    k, v, tables, ctx, _, _ = paged_cache([10], 1, 16, 4, torch.bfloat16)
    q = torch.randn(1, 2, 16).bfloat16()
    out = ext.paged_attention(q, k, v, tables, ctx, 0.25, None, None, 0, 0.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ops.paged_attention_reference(q, k, v, tables, ctx, 0.25), atol=1e-2, rtol=1e-2)


@needs_kernels
def test_bad_tables_and_lengths_are_refused_not_read():
    k, v, tables, ctx, _, _ = paged_cache([10], 1, 16, 4)
    q = torch.randn(1, 2, 16)
    bad = tables.clone()
    bad[0, 1] = 1000
    with pytest.raises(RuntimeError, match="is not a block of the cache"):
        ext.paged_attention(q, k, v, bad, ctx, 0.25, None, None, 0, 0.0)
    with pytest.raises(RuntimeError, match="outside"):
        ext.paged_attention(q, k, v, tables, torch.tensor([13], dtype=torch.int32), 0.25, None, None, 0, 0.0)
    with pytest.raises(RuntimeError, match="need k_scale"):
        ext.paged_attention(q, k.to(torch.int8), v.to(torch.int8), tables, ctx, 0.25, None, None, 0, 0.0)


def test_fallback_runs_the_reference():
    k, v, tables, ctx, _, _ = paged_cache([10], 1, 16, 4)
    q = torch.randn(1, 2, 16)
    with ops.fallback():
        out = ops.paged_attention(q, k, v, tables, ctx, 0.25)
    assert torch.equal(out, ops.paged_attention_reference(q, k, v, tables, ctx, 0.25))


def _write_both(store, input_dtype, strided):
    """Run paged_write through the kernel and the reference on fresh caches; return both results."""
    g = torch.Generator().manual_seed(4)
    blocks, size, heads, dim, n = 6, 4, 3, 40, 9
    slots = torch.randperm(blocks * size, generator=g)[:n]
    k = torch.randn(heads, n, dim, generator=g).to(input_dtype)
    v = torch.randn(heads, n, dim, generator=g).to(input_dtype)
    k, v = (
        (k.transpose(0, 1), v.transpose(0, 1))
        if strided
        else (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
    )
    results = []
    for write in (ext.paged_write, ops.paged_write_reference):
        caches = [torch.zeros(blocks, size, heads, dim, dtype=store) for _ in range(2)]
        scales = [torch.zeros(blocks, size, heads) for _ in range(2)] if store == torch.int8 else [None, None]
        write(caches[0], caches[1], slots, k, v, scales[0], scales[1])
        results.append((caches, scales))
    return results


@needs_kernels
@pytest.mark.parametrize("store", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_paged_write_matches_reference(store, input_dtype, strided):
    (kernel_caches, kernel_scales), (ref_caches, ref_scales) = _write_both(store, input_dtype, strided)
    for got, expected in zip(kernel_caches, ref_caches):
        assert torch.equal(got, expected)
    if store == torch.int8:
        for got, expected in zip(kernel_scales, ref_scales):
            assert torch.equal(got, expected)


@needs_kernels
def test_paged_write_refuses_bad_slots_and_non_finite_int8_input():
    cache = torch.zeros(2, 4, 1, 8)
    rows = torch.ones(1, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ext.paged_write(cache, cache.clone(), torch.tensor([8]), rows, rows, None, None)
    codes, scales = torch.zeros(2, 4, 1, 8, dtype=torch.int8), torch.zeros(2, 4, 1)
    bad = torch.full((1, 1, 8), float("nan"))
    with pytest.raises(RuntimeError, match="NaN or inf"):
        ext.paged_write(codes, codes.clone(), torch.tensor([0]), bad, rows, scales, scales.clone())
