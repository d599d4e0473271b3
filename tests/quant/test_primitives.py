import pytest
import torch

from tuili.quant.primitives import (
    dequantize,
    max_abs_error,
    mse,
    pack_int4,
    qparams,
    qrange,
    quantize,
    quantize_weight,
    sqnr,
    unpack_int4,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(bits, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(64, 96)
    scale, zero = qparams(x.amin(), x.amax(), bits, symmetric)
    back = dequantize(quantize(x, scale, zero, bits, symmetric), scale, zero)
    assert (back - x).abs().max() <= scale / 2 + 1e-6


def test_ranges():
    assert qrange(8, True) == (-127, 127) and qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-7, 7) and qrange(4, False) == (0, 15)


def test_symmetric_scale_and_asymmetric_zero_point_follow_the_formulas():
    x = torch.tensor([-1.0, 0.5, 3.0])
    scale, zero = qparams(x.amin(), x.amax(), 8, symmetric=True)
    assert scale == pytest.approx(3.0 / 127) and zero == 0
    scale, zero = qparams(x.amin(), x.amax(), 8, symmetric=False)
    assert scale == pytest.approx(4.0 / 255) and zero == round(1.0 / (4.0 / 255))


def test_zero_is_exact_and_constant_or_zero_groups_are_safe():
    w = torch.zeros(4, 64)
    w[1] = 2.5  # a constant row
    q = quantize_weight(w, 4, 32, symmetric=False)
    assert torch.equal(q.dequantize(), w)
    assert torch.isfinite(q.scale).all()
    q = quantize_weight(w, 8, "channel", symmetric=True)
    torch.testing.assert_close(q.dequantize(), w)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_group_that_does_not_divide_the_row_is_padded(group_size):
    torch.manual_seed(0)
    w = torch.randn(8, 576)  # 576 = 4.5 groups of 128
    q = quantize_weight(w, 4, group_size, symmetric=False)
    assert q.scale.shape == (8, -(-576 // group_size)) and q.q.shape == (8, 576)
    assert sqnr(w, q.dequantize()) > 15
    last = q.dequantize()[:, -(576 % group_size or group_size) :]
    assert torch.isfinite(last).all()


def test_per_group_beats_per_channel():
    torch.manual_seed(0)
    w = torch.randn(32, 256) * torch.logspace(-1, 1, 256)  # columns of very different ranges
    assert sqnr(w, quantize_weight(w, 4, 32, False).dequantize()) > sqnr(
        w, quantize_weight(w, 4, "channel", False).dequantize()
    )


@pytest.mark.parametrize("cols", [64, 65])
@pytest.mark.parametrize("signed", [True, False])
def test_int4_packing_round_trips(cols, signed):
    q = torch.randint(-7, 8, (5, cols)).to(torch.int8) if signed else torch.randint(0, 16, (5, cols)).to(torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-cols // 32) * 16)  # 32 codes per 16 bytes
    assert torch.equal(unpack_int4(packed, cols, signed), q)


def test_non_finite_weights_are_refused():
    w = torch.randn(4, 32)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(w, 8, "channel", True)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(bits=0), "bits must be"),
        (dict(bits=9), "bits must be"),
        (dict(granularity=1024), "larger than the row"),
        (dict(granularity=0), "positive"),
    ],
)
def test_bad_arguments_are_refused(bad, message):
    args = dict(bits=4, granularity=32) | bad
    with pytest.raises(ValueError, match=message):
        quantize_weight(torch.randn(4, 64), args["bits"], args["granularity"], False)


def test_error_metrics():
    x = torch.tensor([1.0, -2.0, 3.0])
    assert mse(x, x) == 0 and sqnr(x, x) == float("inf")
    assert max_abs_error(x, x + torch.tensor([0.0, 0.5, -0.25])) == 0.5
    assert sqnr(x, x * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise is 1/10 of the signal's amplitude
