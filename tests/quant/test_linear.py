import copy

import pytest
import torch
from torch import nn

from tuili.kernels import repack
from tuili.quant import Int8Linear, WeightOnlyLinear
from tuili.quant.primitives import sqnr

pytestmark = pytest.mark.usefixtures("kernel_path")  # every test on both paths


@pytest.fixture
def ref():
    torch.manual_seed(0)
    return nn.Linear(200, 96, bias=True)


@pytest.mark.parametrize(
    "bits, group_size, symmetric, min_db",
    [
        (8, "channel", True, 38),
        (4, 32, False, 18),
        (4, 64, True, 14),
        (4, 128, False, 16),
        (3, 32, False, 12),
    ],
)
def test_weight_only_tracks_float(ref, bits, group_size, symmetric, min_db):
    x = torch.randn(5, 7, 200)
    q = WeightOnlyLinear.from_float(ref, bits, group_size, symmetric)
    assert sqnr(ref(x), q(x)) > min_db


def test_weight_only_output_equals_float_matmul_with_its_dequantized_weight(ref):
    q = WeightOnlyLinear.from_float(ref, 4, 32, False)
    x = torch.randn(3, 200)
    torch.testing.assert_close(q(x), x @ q.dequantize().T + ref.bias)


def test_int4_storage_is_packed_two_per_byte(ref):
    q = WeightOnlyLinear.from_float(ref, 4, 64, False)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (96, 7 * 16)  # 200 codes -> 7 chunks of 32
    stored = sum(b.numel() * b.element_size() for b in q.buffers())
    assert stored < ref.weight.numel() * 4 / 5  # ~1/8 of fp32 plus scales and zero points


@pytest.mark.parametrize("static", [False, True])
def test_int8_activation_tracks_float(ref, static):
    x = torch.randn(4, 9, 200)
    scale = x.abs().max() / 127 if static else None
    q = Int8Linear.from_float(ref, scale)
    assert q.static == static
    assert sqnr(ref(x), q(x)) > 30


def test_int8_activation_matches_its_integer_definition(ref):
    q = Int8Linear.from_float(ref)
    x = torch.randn(6, 200)
    qx, sx = q.quantize_input(x)
    expected = (qx.float() @ q.qweight.float().T) * sx * q.weight_scale + ref.bias
    torch.testing.assert_close(q(x), expected)


def test_dynamic_per_token_scales_survive_an_outlier_token(ref):
    x = torch.randn(8, 200)
    x[0] *= 1000  # one huge token must not wreck the others (it would with a per-tensor scale)
    q = Int8Linear.from_float(ref)
    assert sqnr(ref(x[1:]), q(x)[1:]) > 30


def test_modules_survive_deepcopy_and_state_dict(ref):
    q = WeightOnlyLinear.from_float(ref, 4, 32, False)
    clone = WeightOnlyLinear(200, 96, 4, 32, False, bias=True)
    clone.load_state_dict(copy.deepcopy(q.state_dict()))
    x = torch.randn(2, 200)
    assert torch.equal(clone(x), q(x))


@pytest.mark.parametrize(
    "bits, group_size, symmetric", [(4, 32, False), (4, 64, True), (4, 128, False), (8, "channel", True), (8, 32, True)]
)
@pytest.mark.parametrize("m", [1, 3, 16, 40])
def test_kernel_and_fallback_paths_agree(ref, monkeypatch, bits, group_size, symmetric, m):
    from tuili.kernels import ops

    q = WeightOnlyLinear.from_float(ref, bits, group_size, symmetric)
    x = torch.randn(m, 200)
    fast = q(x)
    monkeypatch.setattr(ops, "extension", lambda: None)
    torch.testing.assert_close(fast, q(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q(x), x @ q.dequantize().T + ref.bias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, False), (4, 64, True), (8, "channel", True)])
@pytest.mark.parametrize("m", [1, 16, 64, 65])
def test_bf16_compute_rounds_only_the_activations(ref, bits, group_size, symmetric, m):
    """Under compute_dtype(bf16), small batches take the 16-bit dot-product kernels (codes exact,
    activations rounded to bf16 for W4 and to int16 per token for W8, fp32 sums); large ones a
    bf16 GEMM; both stay close to the fp32 product."""
    from tuili.quant.kernel_layer import compute_dtype

    q = WeightOnlyLinear.from_float(ref, bits, group_size, symmetric)
    x = torch.randn(m, 200)
    with compute_dtype(torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.float32
    exact = x @ q.dequantize().T + ref.bias
    torch.testing.assert_close(y, exact, atol=0.05, rtol=0.02)
    from tuili.kernels import ops
    from tuili.kernels.contract import MAX_M

    if m <= MAX_M and repack.bf16_dot_products():  # the kernels' contract (the bf16 GEMM rounds weights too)
        gemv = m <= repack.small_batch_rows(bits)  # where this CPU runs it faster: the fp32 GEMV, x exact
        rounded = x if gemv else ops.quantize_rows_i16(x) if bits == 8 else x.bfloat16().float()
        torch.testing.assert_close(y, rounded @ q.dequantize().T + ref.bias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("m", [1, 7, 64, 65])
def test_int8_kernel_and_fallback_paths_are_identical(ref, static, m):
    from tuili.kernels import ops

    x = torch.randn(m, 200)
    q = Int8Linear.from_float(ref, x.abs().max() / 127 if static else None)
    fast = q(x)
    with ops.fallback():
        assert torch.equal(fast, q(x))


@pytest.mark.parametrize("m", [1, 5, 40])
def test_w4a8_rounds_activations_per_group_on_both_paths(ref, m):
    from tuili.kernels import ops
    from tuili.quant import W4A8Linear

    q = W4A8Linear.from_float(ref, 4, 64, False)
    x = torch.randn(m, 200)
    expected = ops.quantize_groups(x, 64) @ q.dequantize().T + ref.bias
    torch.testing.assert_close(q(x), expected, atol=1e-4, rtol=1e-4)
    assert sqnr(ref(x), q(x)) > 15


def test_w4a8_refuses_groups_the_kernel_cannot_take(ref):
    from tuili.quant import W4A8Linear

    with pytest.raises(ValueError, match="multiple of 32"):
        W4A8Linear.from_float(ref, 4, 48, False)


@pytest.mark.parametrize("bits, group", [(8, "channel"), (4, 32)])
def test_prefill_in_bf16_stays_close_and_keeps_the_callers_dtype(bits, group):
    from tuili.quant.kernel_layer import compute_dtype

    torch.manual_seed(0)
    layer = WeightOnlyLinear.from_float(nn.Linear(96, 64), bits, group, bits == 8)
    x = torch.randn(100, 96)  # past the kernels' rows: the dequantize-and-GEMM path
    with torch.no_grad():
        exact = layer(x)
        with compute_dtype(torch.bfloat16):
            fast = layer(x)
        small = layer(x[:2])
        with compute_dtype(torch.bfloat16):
            small_fast = layer(x[:2])
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)
    assert (fast - exact).norm() / exact.norm() < 1e-2  # bf16 activations: about 3 significant digits
    from tuili.kernels import ops

    if ops.available() and not repack.bf16_dot_products():  # no AVX512-BF16: decoding keeps its fp32 kernels
        assert torch.equal(small, small_fast)
    assert (small_fast - small).norm() / small.norm() < 1e-2  # else the bf16 kernels (or the bf16 GEMM)
