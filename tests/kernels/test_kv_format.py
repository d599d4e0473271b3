import pytest
import torch

from tuili.kernels.kv_format import dequantize_kv, quantize_kv
from tuili.quant.primitives import sqnr


@pytest.mark.parametrize("granularity, min_db", [("token", 38), ("head", 30)])
def test_kv_round_trip_error(granularity, min_db):
    torch.manual_seed(0)
    k = torch.randn(2, 3, 64, 64) * torch.rand(2, 3, 64, 1) * 4  # tokens of very different norms
    q, scale = quantize_kv(k, granularity)
    assert q.dtype == torch.int8
    back = dequantize_kv(q, scale)
    assert sqnr(k, back) > min_db
    assert (back - k).abs().max() <= scale.max() / 2 + 1e-6


def test_per_token_beats_per_head_on_ragged_norms():
    torch.manual_seed(0)
    v = torch.randn(1, 2, 128, 32) * torch.logspace(-2, 1, 128)[:, None]
    assert sqnr(v, dequantize_kv(*quantize_kv(v, "token"))) > sqnr(v, dequantize_kv(*quantize_kv(v, "head")))


def test_kv_errors():
    with pytest.raises(ValueError, match="granularity"):
        quantize_kv(torch.zeros(1, 1, 1, 4), "channel")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_kv(torch.tensor([[[[float("inf")]]]]))
