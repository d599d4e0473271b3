"""The C++ quantized GEMV/GEMM kernels against their PyTorch references, on odd shapes too."""

import pytest
import torch

from tuili.kernels import dequant, ops, repack
from tuili.kernels import int_products as int8
from tuili.kernels.build import extension
from tuili.kernels.int_products import int_products_f64
from tuili.quant.primitives import pack_int4

ext = extension()
needs_kernels = pytest.mark.skipif(ext is None, reason="C++ kernels not built on this machine")


def random_w4(n, k, group_size, flip, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    groups = -(-k // group_size)
    scale = torch.rand(n, groups, generator=g) * 0.1 + 0.01
    zs = scale * torch.randint(0, 16, (n, groups), generator=g).float()
    return pack_int4(codes), scale, zs


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16, 33, 64])
@pytest.mark.parametrize(
    "n, k, group_size",
    [(96, 576, 64), (576, 1536, 128), (7, 576, 128), (33, 100, 32), (5, 577, 32), (8, 64, 64), (17, 130, 130)],
)
@pytest.mark.parametrize("flip", [False, True])
def test_w4_kernel_matches_reference(m, n, k, group_size, flip):
    w, scale, zs = random_w4(n, k, group_size, flip)
    x = torch.randn(m, k)
    expected = ops.w4_linear_reference(x, w, scale, zs, group_size, flip)
    torch.testing.assert_close(ext.w4_linear(x, w, scale, zs, group_size, flip), expected, atol=1e-3, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 4, 16, 64])
@pytest.mark.parametrize(
    "n, k, group_size", [(96, 576, 576), (576, 1536, 1536), (33, 100, 100), (9, 577, 32), (4, 1536, 64)]
)
def test_w8_kernel_matches_reference(m, n, k, group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, -(-k // group_size), generator=g) * 0.01
    x = torch.randn(m, k)
    expected = ops.w8_linear_reference(x, w, scale, group_size)
    torch.testing.assert_close(ext.w8_linear(x, w, scale, group_size), expected, atol=1e-3, rtol=1e-4)


needs_bf16 = pytest.mark.skipif(ext is None or not ext.bf16(), reason="the bf16 dot-product kernels need AVX512-BF16")


@needs_bf16
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 16, 17, 33, 64])
@pytest.mark.parametrize(
    "n, k, group_size",
    [
        (96, 576, 64),
        (576, 1536, 128),
        (7, 576, 32),
        (33, 100, 32),
        (5, 577, 32),
        (8, 64, 64),
        (17, 130, 130),
        (40, 1536, 1536),
    ],
)
@pytest.mark.parametrize("flip", [False, True])
def test_bf16_w4_kernel_is_the_product_with_bf16_rounded_activations(m, n, k, group_size, flip):
    w, scale, zs = random_w4(n, k, group_size, flip, seed=m)
    x = torch.randn(m, k)
    packed, scale_p, zs_p = repack.pack_w4_bf16(w, k, flip, scale, zs)
    assert packed.shape == (-(-n // 16), -(-k // 4), 32) and scale_p.shape == (-(-n // 16), scale.shape[1], 16)
    expected = ops.w4_linear_reference(x.bfloat16().float(), w, scale, zs, group_size, flip)
    torch.testing.assert_close(
        ext.w4_linear_bf16(x, packed, scale_p, zs_p, n, group_size), expected, atol=1e-3, rtol=1e-4
    )


needs_vnni = pytest.mark.skipif(
    ext is None or ext.isa() != "avx512-vnni", reason="the int16 W8 kernel needs AVX512-VNNI"
)


@needs_vnni
@pytest.mark.parametrize("m", [1, 5, 16, 40])
def test_several_w8_layers_on_one_input_equal_one_call_each(m):
    # q, k, v-like shapes, one of them not a multiple of 16 and one grouped: each layer keeps its own layout
    g = torch.Generator().manual_seed(m)
    k = 576
    layers = []
    for n, group_size in ((576, k), (40, 64), (192, k)):
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, -(-k // group_size), generator=g) * 0.01
        layers.append((*repack.pack_w8_i16(w, scale), n, group_size))
    x = torch.randn(m, k, generator=g) * 4
    outs = ext.w8_linear_i16_multi(x, *[list(column) for column in zip(*layers)])
    assert [o.shape for o in outs] == [(m, 576), (m, 40), (m, 192)]
    for out, layer in zip(outs, layers):
        assert torch.equal(out, ext.w8_linear_i16(x, *layer))  # the same blocks, bit for bit
    assert all(
        o.dtype == torch.bfloat16 for o in ext.w8_linear_i16_multi(x.bfloat16(), *[list(c) for c in zip(*layers)])
    )
    with pytest.raises(RuntimeError, match="one packed weight, scale, N and group size per layer"):
        ext.w8_linear_i16_multi(x, [layers[0][0]], [], [576], [k])
    with pytest.raises(RuntimeError, match="N-major packing"):
        ext.w8_linear_i16_multi(x[:, :100], [layers[0][0]], [layers[0][1]], [576], [k])


@needs_vnni
def test_int16_w8_kernel_saturated_activations_do_not_overflow():
    # every product at its largest (32767 · -128) for 2,048 k: four int32 chunks, each near 2^31
    n, k = 16, 2048
    w = torch.full((n, k), -128, dtype=torch.int8)
    scale = torch.ones(n, 1)
    x = torch.full((2, k), 3.0)
    packed, scale_p = repack.pack_w8_i16(w, scale)
    torch.testing.assert_close(ext.w8_linear_i16(x, packed, scale_p, n, k), torch.full((2, n), -128.0 * 3 * k))


@needs_vnni
def test_int16_rounding_is_finer_than_bf16_for_typical_activations():
    x = torch.randn(64, 576)
    x[:, 0] = 20.0  # an outlier channel, as LLM activations have
    err_i16 = (ops.quantize_rows_i16(x) - x).abs().mean()
    err_bf16 = (x.bfloat16().float() - x).abs().mean()
    assert err_i16 < err_bf16 / 4


@needs_bf16
def test_bf16_kernels_refuse_weights_packed_for_another_shape():
    w, scale, zs = random_w4(32, 128, 32, False)
    packed, scale_p, zs_p = repack.pack_w4_bf16(w, 128, False, scale, zs)
    with pytest.raises(RuntimeError, match="packed weights"):
        ext.w4_linear_bf16(torch.randn(2, 256), packed, scale_p, zs_p, 32, 32)
    with pytest.raises(RuntimeError, match="group_size"):
        ext.w4_linear_bf16(torch.randn(2, 128), packed, scale_p, zs_p, 32, 64)


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("n, k", [(96, 576), (7, 577), (33, 100), (1536, 64), (5, 15)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_gemv_matches_f_linear(m, n, k, bias):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    torch.testing.assert_close(ext.f32_linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 7, 8, 9, 16, 23, 64])
@pytest.mark.parametrize("n, k", [(96, 576), (33, 577), (17, 100), (1536, 64), (5, 3)])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_w8a8_is_bit_identical_to_int_mm(m, n, k, static, dtype):
    check_packed_w8a8(m, n, k, static, dtype)


@needs_kernels
@pytest.mark.parametrize("m, n, k", [(300, 48, 8200), (130, 1040, 2048)])
def test_packed_w8a8_batches_in_chunks_and_panels_are_bit_identical(m, n, k):
    """AMX: rows past one chunk (1 MiB of codes), output blocks past one panel, an odd block left."""
    check_packed_w8a8(m, n, k, False, torch.bfloat16)


def check_packed_w8a8(m, n, k, static, dtype):
    if ext.isa() != "avx512-vnni":
        pytest.skip("the packed W8A8 kernel is VNNI only (elsewhere Int8Linear keeps the row kernel)")
    x, w, sw = random_w8a8(m, n, k)
    x = x.to(dtype)
    s_in = torch.tensor(0.07) if static else None
    packed, row_sum = ops.w8a8_pack(w)
    assert packed.shape == (-(-n // 16), -(-k // 4), 16, 4)
    assert torch.equal(
        ext.w8a8_linear_packed(x, packed, row_sum, sw, s_in, n), ops.w8a8_linear_reference(x, w, sw, s_in)
    )


def test_linear_takes_the_kernel_only_where_it_is_exact_and_faster():
    x, w, b = torch.randn(2, 3, 40), torch.randn(24, 40), torch.randn(24)
    torch.testing.assert_close(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)
    many = torch.randn(ops.f32_gemv_rows() + 1, 40)  # past the kernel's rows: PyTorch's sgemm, bit for bit
    assert torch.equal(ops.linear(many, w), torch.nn.functional.linear(many, w))
    wg = w.clone().requires_grad_()
    y = ops.linear(x, wg, b)  # autograd records: PyTorch's op, so gradients flow
    y.sum().backward()
    assert wg.grad is not None


@needs_kernels
@pytest.mark.parametrize("kernel", ["w4", "w8"])
def test_bf16_activations_give_bf16_results_close_to_fp32(kernel):
    x = torch.randn(3, 576)
    if kernel == "w4":
        w, scale, zs = random_w4(64, 576, 64, False)
        run = lambda x: ext.w4_linear(x, w, scale, zs, 64, False)  # noqa: E731
    else:
        w = torch.randint(-127, 128, (64, 576), dtype=torch.int8)
        scale = torch.rand(64, 1) * 0.01
        run = lambda x: ext.w8_linear(x, w, scale, 576)  # noqa: E731
    y = run(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), run(x.bfloat16().float()), atol=0.05, rtol=1e-2)


@needs_bf16
@pytest.mark.parametrize("m", [1, 5, 16, 40])
def test_nmajor_kernels_read_and_write_bf16_as_the_fp32_path_converted(m):
    """bf16 activations go in and come out as such (no whole-tensor conversions around the call),
    bit for bit what the fp32 call on the same values gives, rounded by torch (nearest even)."""
    n, k = 48, 512
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    w, scale, zs = random_w4(n, k, 128, False, seed=m)
    w4 = (*repack.pack_w4_bf16(w, k, False, scale, zs), n, 128)
    w8 = (*repack.pack_w8_i16(torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, 16) * 0.01), n, 32)
    for run in (lambda x: ext.w4_linear_bf16(x, *w4), lambda x: ext.w8_linear_i16(x, *w8)):
        y = run(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, run(x.float()).bfloat16())


@needs_vnni
@pytest.mark.parametrize("m", [1, 3, 16, 21, 64])
@pytest.mark.parametrize(
    "n, k, group_size",
    [
        (96, 576, 576),
        (576, 1536, 1536),
        (33, 100, 100),
        (9, 577, 32),
        (4, 1536, 64),
        (16, 6, 6),
        (20, 2052, 2052),
        (18, 1040, 520),
    ],
)
def test_int16_w8_kernel_is_the_product_with_int16_rounded_activations(m, n, k, group_size):
    # k = 2052 and groups of 520 are longer than one int32 chunk (512 products): the chunks must add up
    g = torch.Generator().manual_seed(m)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, -(-k // group_size), generator=g) * 0.01
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    packed, scale_p = repack.pack_w8_i16(w, scale)
    expected = ops.w8_linear_reference(ops.quantize_rows_i16(x), w, scale, group_size)
    torch.testing.assert_close(ext.w8_linear_i16(x, packed, scale_p, n, group_size), expected, atol=1e-3, rtol=1e-4)
    assert ext.w8_linear_i16(x.bfloat16(), packed, scale_p, n, group_size).dtype == torch.bfloat16


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16])
@pytest.mark.parametrize(
    "n, k, group_size",
    [(96, 576, 64), (576, 1536, 128), (7, 576, 128), (33, 100, 32), (5, 577, 64), (8, 64, 64), (3, 300, 256)],
)
@pytest.mark.parametrize("flip", [False, True])
def test_w4a8_kernel_matches_reference(m, n, k, group_size, flip):
    w, scale, zs = random_w4(n, k, group_size, flip)
    x = torch.randn(m, k)
    x[:, 1] *= 20
    expected = ops.w4a8_linear_reference(x, w, scale, zs, group_size, flip)
    torch.testing.assert_close(ext.w4a8_linear(x, w, scale, zs, group_size, flip), expected, atol=1e-3, rtol=1e-4)


def test_w4a8_reference_is_w4a16_on_int8_rounded_activations():
    w, scale, zs = random_w4(16, 96, 32, False)
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(3))
    exact = ops.w4_linear_reference(x, w, scale, zs, 32, False)
    approx = ops.w4a8_linear_reference(x, w, scale, zs, 32, False)
    assert not torch.equal(exact, approx)  # the activations really are rounded
    assert (approx - exact).norm() / exact.norm() < 0.01  # by about 1/254 of each group's range
    xg = x.view(2, 3, 32)
    assert torch.equal(
        ops.quantize_groups(x, 32),
        ((xg / (xg.abs().amax(-1, keepdim=True) / 127)).round() * (xg.abs().amax(-1, keepdim=True) / 127)).flatten(1),
    )


def random_w8a8(m, n, k, seed=2):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x = torch.randn(m, k, generator=g)
    x[:, k // 3] *= 30  # an outlier channel, as in real activations
    return x, w, torch.rand(n, generator=g) * 0.01 + 1e-3


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 4, 5, 16, 17, 64])
@pytest.mark.parametrize("n, k", [(576, 576), (192, 1536), (7, 577), (33, 100), (16, 64), (3, 5)])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_kernel_equals_int_mm_bit_for_bit(m, n, k, static):
    """Integer dot products are exact and the scales multiply in the same order: no tolerance."""
    x, w, sw = random_w8a8(m, n, k)
    input_scale = torch.tensor(x.abs().max().item() / 127 * 0.8) if static else None  # clips the largest
    assert torch.equal(ext.w8a8_linear(x, w, sw, input_scale), ops.w8a8_linear_reference(x, w, sw, input_scale))


@needs_kernels
@pytest.mark.skipif(ext is None or not ext.isa().startswith("avx512"), reason="the W8A8 GEMM path is AVX-512")
@pytest.mark.parametrize("m, n, k", [(65, 576, 576), (300, 33, 100), (128, 7, 577)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_gemm_path_equals_the_twin_bit_for_bit(m, n, k, dtype, static):
    """Large batches: the rows quantized and the int32 product scaled each in one pass around
    torch._int_mm, exactly as the twin computes them; a layer's forward takes it past 64 rows."""
    from tuili.quant.int8_linear import Int8Linear

    x, w, sw = random_w8a8(m, n, k, seed=m)
    x = x.to(dtype)
    input_scale = torch.tensor(x.float().abs().max().item() / 127 * 0.8) if static else None
    expected = ops.w8a8_linear_reference(x, w, sw, input_scale)
    assert torch.equal(ext.w8a8_linear_gemm(x, w, sw, input_scale), expected)
    layer = Int8Linear(k, n, bias=False, static=static)
    layer.qweight.copy_(w)
    layer.weight_scale.copy_(sw)
    if static:
        layer.input_scale.copy_(input_scale)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


@needs_kernels
def test_int8_products_in_float64_are_torch_int_mm_exactly():
    """Where PyTorch's int8 GEMM has no VNNI to run on, the W8A8 twin sums the same integers in a
    float64 GEMM, a slice of output features at a time; saturated codes make the largest sums."""
    g = torch.Generator().manual_seed(3)
    qx = torch.randint(-127, 128, (37, 2100), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (11, 2100), generator=g, dtype=torch.int8)
    qx[0], w[0] = 127, -127  # |sum| = 2100 · 127², beyond float32's exact integers
    exact = torch._int_mm(qx, w.t())
    assert torch.equal(int_products_f64(qx, w, rows=4), exact.double())
    assert torch.equal(int_products_f64(qx, w).float(), exact.float())
    assert torch.equal(int8.int_products(qx, w), exact.float())  # whichever route this CPU takes


def test_w8a8_batches_take_the_exact_float64_route_where_int_mm_is_a_plain_loop(monkeypatch):
    """An AVX-512 CPU without VNNI or AMX: the batched W8A8 kernel would call torch._int_mm, so the
    twin's float64 products run instead, with the same result."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(24, 64, generator=g), torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(8, generator=g) * 0.01
    monkeypatch.setattr(ops, "_has_avx512", lambda: True)
    monkeypatch.setattr(ops, "int_mm_is_fast", lambda: False)
    monkeypatch.setattr(int8, "int_mm_is_fast", lambda: False)
    monkeypatch.setattr(ops, "_run", lambda *a: pytest.fail("the batched kernel ran on torch._int_mm"))
    assert torch.equal(ops.w8a8_gemm(x, w, scale), ops.w8a8_linear_reference(x, w, scale))


def test_w8a8_kernel_takes_bf16_and_zero_rows():
    x, w, sw = random_w8a8(4, 32, 128)
    x[1] = 0
    y = ext.w8a8_linear(x.bfloat16(), w, sw, None)
    assert y.dtype == torch.bfloat16 and torch.equal(y[1], torch.zeros(32, dtype=torch.bfloat16))
    assert torch.equal(y, ops.w8a8_linear_reference(x.bfloat16(), w, sw))


@needs_kernels
def test_bad_shapes_are_refused():
    w, scale, zs = random_w4(8, 64, 32, False)
    with pytest.raises(RuntimeError, match="x must be"):
        ext.w4_linear(torch.randn(2, 64).double(), w, scale, zs, 32, False)
    with pytest.raises(RuntimeError, match="w must be"):
        ext.w4_linear(torch.randn(2, 96), w, scale, zs, 32, False)
    with pytest.raises(RuntimeError, match="w must be"):
        ext.w8a8_linear(torch.randn(2, 96), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4), None)


def test_fallback_is_used_without_the_extension(monkeypatch):
    monkeypatch.setattr(ops, "extension", lambda: None)
    w, scale, zs = random_w4(8, 64, 32, False)
    x = torch.randn(2, 64)
    assert torch.equal(ops.w4_linear(x, w, scale, zs, 32, False), ops.w4_linear_reference(x, w, scale, zs, 32, False))
    assert ops.isa() == "pytorch"


def test_fallback_context_forces_the_pytorch_path_and_restores_it():
    before = ops.isa()
    with ops.fallback():
        assert ops.isa() == "pytorch" and not ops.available()
    assert ops.isa() == before


DEQUANT_SHAPES = [(96, 576, 64), (33, 100, 32), (5, 577, 32), (17, 130, 130), (8, 64, 16), (16, 2048, 2048)]


@needs_kernels
@pytest.mark.parametrize("n, k, group_size", DEQUANT_SHAPES)
@pytest.mark.parametrize("bf16", [False, True])
def test_dequantize_kernels_give_the_references_values_bit_for_bit(n, k, group_size, bf16):
    for flip in (False, True):
        if group_size % 32 and group_size < k:
            break  # W4 takes groups of 32 (or whole rows)
        w, scale, zs = random_w4(n, k, group_size, flip)
        expected = dequant.dequantize_w4_reference(w, scale, zs, k, group_size, flip, bf16)
        assert torch.equal(ext.dequantize_w4(w, scale, zs, k, group_size, flip, bf16, None), expected)
        out = dequant.workspace(n, k, expected.dtype)
        assert ext.dequantize_w4(w, scale, zs, k, group_size, flip, bf16, out).data_ptr() == out.data_ptr()
        assert torch.equal(out, expected)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n, -(-k // group_size)) * 0.01
    assert torch.equal(
        ext.dequantize_w8(w8, s8, group_size, bf16, None), dequant.dequantize_w8_reference(w8, s8, group_size, bf16)
    )


NMAJOR_SHAPES = [(96, 576, 64), (33, 100, 16), (5, 578, 32), (17, 130, 130), (48, 4096, 128), (16, 36, 36)]


@pytest.mark.parametrize("n, k, group_size", NMAJOR_SHAPES)
def test_nmajor_packings_unpack_to_their_codes_and_scales(n, k, group_size):
    w, scale, zs = random_w4(n, k, group_size, False)
    codes = ops._unpack_w4(w, k, False)
    packed, scale_p, zs_p = repack.pack_w4_bf16(w, k, False, scale, zs)
    rows = torch.tensor([0, n - 1, n // 2])
    assert torch.equal(repack.nmajor_codes(packed, torch.arange(n), k), codes)
    assert torch.equal(repack.nmajor_codes(packed, rows, k), codes[rows])
    assert torch.equal(repack.nmajor_groups(scale_p, rows), scale[rows])
    assert torch.equal(repack.nmajor_groups(zs_p, rows), zs[rows])
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    assert torch.equal(repack.nmajor_codes(repack.pack_w8_i16(q, scale)[0], rows, k), q[rows])


@needs_kernels
@pytest.mark.parametrize("n, k, group_size", NMAJOR_SHAPES)
@pytest.mark.parametrize("bf16", [False, True])
def test_dequantize_from_the_nmajor_packing_gives_the_references_values(n, k, group_size, bf16):
    w, scale, zs = random_w4(n, k, group_size, True)
    packed, scale_p, zs_p = repack.pack_w4_bf16(w, k, True, scale, zs)
    expected = dequant.dequantize_w4_reference(w, scale, zs, k, group_size, True, bf16)
    assert torch.equal(dequant.dequantize_nmajor_reference(packed, scale_p, zs_p, n, k, group_size, bf16), expected)
    out = dequant.workspace(n, k, expected.dtype)
    got = ext.dequantize_nmajor(packed, scale_p, zs_p, n, k, group_size, bf16, out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, expected)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    packed8, scale8 = repack.pack_w8_i16(q, scale)
    expected8 = dequant.dequantize_w8_reference(q, scale, group_size, bf16)
    assert torch.equal(ext.dequantize_nmajor(packed8, scale8, None, n, k, group_size, bf16, None), expected8)
    with pytest.raises(RuntimeError, match="packed must be"):  # W8 codes given with zs: read as W4
        ext.dequantize_nmajor(packed8, scale8, scale8, n, k, group_size, bf16, None)


@needs_kernels
def test_dequantize_refuses_shapes_it_cannot_read():
    w, scale, zs = random_w4(8, 64, 32, False)
    with pytest.raises(RuntimeError, match="scale must be"):
        ext.dequantize_w4(w, scale[:, :1], zs, 64, 32, False, False, None)
    with pytest.raises(RuntimeError, match="out must be"):
        ext.dequantize_w4(w, scale, zs, 64, 32, False, True, torch.empty(8, 64))


def test_the_workspace_is_reused_and_bounded():
    a = dequant.workspace(64, 64, torch.bfloat16)
    b = dequant.workspace(32, 64, torch.float32)
    assert a.data_ptr() == b.data_ptr() and b.shape == (32, 64)
    big = dequant.workspace(dequant.WORKSPACE_LIMIT // 4 + 1, 1, torch.float32)
    assert big.data_ptr() != a.data_ptr()  # beyond the limit: a tensor of its own


AVX2_CHECK = """
import torch
from tuili.kernels import dequant, ops
from tuili.kernels.build import extension
from tests.kernels.test_ops import random_w4, random_w8a8
from tests.kernels.test_w4a8_nmajor import packed_w4, w4a8_layer_holds_only_the_packing_and_computes_its_product
from tuili.kernels import repack
ext = extension()
assert ext.isa() == "avx2", ext.isa()
for m, n, k, gs in [(1, 96, 576, 64), (5, 7, 577, 32), (16, 33, 100, 100), (35, 50, 256, 32)]:  # 4+ rows: panels
    w, scale, zs = random_w4(n, k, gs, m % 2 == 1)
    x = torch.randn(m, k)
    torch.testing.assert_close(ext.w4_linear(x, w, scale, zs, gs, m % 2 == 1),
                               ops.w4_linear_reference(x, w, scale, zs, gs, m % 2 == 1), atol=1e-3, rtol=1e-4)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n, -(-k // gs)) * 0.01
    expected = ops.w8_linear_reference(x, w8, s8, gs)
    torch.testing.assert_close(ext.w8_linear(x, w8, s8, gs), expected, atol=1e-3, rtol=1e-4)
    wf, b = w8.float(), s8[:, 0]
    torch.testing.assert_close(ext.f32_linear(x, wf, b), torch.nn.functional.linear(x, wf, b), atol=1e-3, rtol=1e-4)
    x, w, sw = random_w8a8(m, n, k)
    assert torch.equal(ext.w8a8_linear(x, w, sw, None), ops.w8a8_linear_reference(x, w, sw))
    if gs % 32 == 0:
        w, scale, zs = random_w4(n, k, gs, True)
        torch.testing.assert_close(ext.w4a8_linear(x, w, scale, zs, gs, True),
                                   ops.w4a8_linear_reference(x, w, scale, zs, gs, True), atol=1e-3, rtol=1e-4)
    if gs % 4 == 0:
        rows, packed = packed_w4(n, k, gs, True)
        torch.testing.assert_close(ext.w4a8_linear_nmajor(x, *packed, n, gs, True),
                                   ops.w4a8_linear_reference(x, *rows, gs, True), atol=1e-3, rtol=1e-4)
    for bf16 in (False, True):
        w, scale, zs = random_w4(n, k, gs, True)
        if gs % 16 == 0:
            packed = repack.pack_w4_bf16(w, k, True, scale, zs)
            assert torch.equal(ext.dequantize_nmajor(*packed, n, k, gs, bf16, None),
                               dequant.dequantize_w4_reference(w, scale, zs, k, gs, True, bf16))
        assert torch.equal(ext.dequantize_w4(w, scale, zs, k, gs, True, bf16, None),
                           dequant.dequantize_w4_reference(w, scale, zs, k, gs, True, bf16))
        assert torch.equal(ext.dequantize_w8(w8, s8, gs, bf16, None), dequant.dequantize_w8_reference(w8, s8, gs, bf16))
assert repack.w4a8_nmajor()
w4a8_layer_holds_only_the_packing_and_computes_its_product()
print("ok")
"""


@needs_kernels
def test_avx2_paths_match_the_references_too():
    """TUILI_ISA=avx2 makes an AVX-512 machine take the AVX2 code, in a fresh process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    result = subprocess.run(
        [sys.executable, "-c", AVX2_CHECK],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "TUILI_ISA": "avx2"},
        timeout=600,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


# rows (1-4 tiles of 16, partial ones), outputs, inputs, group size
AMX_CASES = ((16, 96, 576, 64), (33, 40, 1536, 1536), (5, 7, 576, 32), (64, 48, 1024, 128), (29, 32, 512, 32))
AMX_OFF_CHECK = """
import torch
from tests.kernels.test_ops import random_w4
from tuili.kernels import ops, repack
ext = ops.extension()
assert not ext.amx() and ext.bf16()
for m, n, k, gs in {CASES}:
    w, scale, zs = random_w4(n, k, gs, False, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    packed, scale_p, zs_p = repack.pack_w4_bf16(w, k, False, scale, zs)
    torch.save(ext.w4_linear_bf16(x, packed, scale_p, zs_p, n, gs), f"{OUT}/{m}.pt")
    torch.manual_seed(0)
    w8, s8 = torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, -(-k // gs)) * 0.01
    torch.save(ext.w8_linear_i16(x * 3, *repack.pack_w8_i16(w8, s8), n, gs), f"{OUT}/{m}-w8.pt")
print("ok")
"""


@needs_kernels
@pytest.mark.skipif(ext is None or not ext.amx(), reason="this CPU has no AMX tiles to compare against")
def test_amx_and_the_dot_product_kernel_give_the_same_w4_products(tmp_path):
    """W4 and W8 batches of 4+ rows take AMX tiles where the CPU has them; TUILI_ISA=avx512 makes the
    same CPU take the dot-product kernels (the path of CPUs without AMX), in a fresh process: both
    sum the same exact products, in another order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = AMX_OFF_CHECK.replace("{OUT}", str(tmp_path)).replace("{CASES}", repr(AMX_CASES))
    env = {**os.environ, "TUILI_ISA": "avx512"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
    for m, n, k, gs in AMX_CASES:
        w, scale, zs = random_w4(n, k, gs, False, seed=m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        packed, scale_p, zs_p = repack.pack_w4_bf16(w, k, False, scale, zs)
        ours = ext.w4_linear_bf16(x, packed, scale_p, zs_p, n, gs)
        torch.testing.assert_close(ours, torch.load(tmp_path / f"{m}.pt"), atol=1e-4, rtol=1e-5)
        torch.manual_seed(0)  # the same W8 weights as the other process drew
        w8, s8 = torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, -(-k // gs)) * 0.01
        ours = ext.w8_linear_i16(x * 3, *repack.pack_w8_i16(w8, s8), n, gs)
        torch.testing.assert_close(ours, torch.load(tmp_path / f"{m}-w8.pt"), atol=1e-4, rtol=1e-5)


def test_kernels_build_wherever_a_compiler_and_avx2_exist():
    """Guards the skips above: a broken build must fail the suite, not silently skip every kernel test."""
    import shutil

    from tuili.kernels import build

    if shutil.which("c++") is None or not build._has_avx2():
        pytest.skip("kernels disabled, or no compiler / AVX2 here")
    assert ext is not None and ext.isa() in ("avx512-vnni", "avx512", "avx2")
