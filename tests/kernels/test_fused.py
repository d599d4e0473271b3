"""Fused element-wise kernels (RMSNorm, RoPE) against their PyTorch references."""

import pytest
import torch
import torch.nn.functional as F

from tuili.kernels import ops
from tuili.kernels.build import extension

ext = extension()
needs_kernels = pytest.mark.skipif(ext is None, reason="C++ kernels not built on this machine")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 64), (2, 130), (5, 33)])
def test_rms_norm(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = torch.rand(shape[-1], generator=g).to(dtype)
    out = ext.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ops.rms_norm_reference(x, w, 1e-5), **TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b, t, h, d", [(1, 1, 9, 64), (2, 5, 3, 64), (1, 17, 4, 6), (3, 2, 1, 128)])
def test_rope(dtype, b, t, h, d):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, h, d, generator=g).to(dtype)
    angles = torch.rand(b, t, d // 2, generator=g) * 100
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    out = ext.rope(x, cos, sin)
    torch.testing.assert_close(out, ops.rope_reference(x, cos, sin).to(dtype), **TOL[dtype])


def test_rope_reference_rotates_pairs_by_their_angle():
    """Half-split layout: dims i and i + D/2 form one 2-D pair, rotated by the angle of dim i."""
    x = torch.tensor([[[[1.0, 0.0, 0.0, 2.0]]]])  # pairs (x0, x2) = (1, 0) and (x1, x3) = (0, 2)
    angle = torch.tensor([[[torch.pi / 2, 0.0, torch.pi / 2, 0.0]]])
    out = ops.rope_reference(x, angle.cos(), angle.sin())
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.0, 1.0, 2.0]]]]), atol=1e-6, rtol=0)


@needs_kernels
def test_ops_take_the_reference_when_autograd_records():
    x = torch.randn(2, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    ops.rms_norm(x, w, 1e-6).sum().backward()  # the kernel has no backward: the reference ran
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ops.rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 40), (2, 5, 8192), (1, 17)])
def test_silu_mul_is_pytorchs_silu_then_mul(dtype, shape):
    """In place, each op's result rounded to the dtype as PyTorch's pair rounds it; the exponential is
    tuili's polynomial, so fp32 may differ by an ulp or two."""
    g = torch.Generator().manual_seed(len(shape))
    gate, up = (torch.randn(*shape, generator=g) * 4).to(dtype), torch.randn(*shape, generator=g).to(dtype)
    gate[..., 0] = float("inf")  # silu(inf) = inf
    gate[..., -1] = -100.0  # silu → -0
    expected = F.silu(gate.clone(), inplace=True).mul_(up)
    ours = ops.silu_mul_(gate, up)
    assert ours.data_ptr() == gate.data_ptr()  # in place
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    transposed = ops.silu_mul_(torch.ones(4, 3).t(), torch.ones(3, 4))  # not contiguous: PyTorch's pair
    torch.testing.assert_close(transposed, F.silu(torch.ones(3, 4)))


@pytest.mark.skipif(ext is None or not ext.isa().startswith("avx512"), reason="the argmax kernel is AVX-512")
@pytest.mark.parametrize("vocab", [1, 15, 16, 49152, 49157])
def test_argmax_is_torchs_first_maximum(vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = torch.randn(6, vocab, generator=g)
    rows[1] = rows[1].round()  # many ties: the first one wins
    rows[2, -1] = float("nan")  # NaN counts as the largest, the first one wins
    rows[2, vocab // 2] = float("nan")
    rows[3] = float("-inf")
    rows[4, vocab - 1] = float("inf")
    rows[5] = 7.0
    for x in (rows, rows.to(torch.bfloat16)):  # bf16: many more ties
        assert torch.equal(ext.argmax_rows(x), x.argmax(dim=-1))
        assert torch.equal(ops.argmax(x), x.argmax(dim=-1))


def test_argmax_takes_torch_for_what_the_kernel_does_not_take():
    logits = torch.randn(3, 40)
    for x in (logits.half(), logits[:, ::2], logits[0], logits.double()):
        assert torch.equal(ops.argmax(x), x.argmax(dim=-1))


@pytest.mark.skipif(ext is None or not ext.isa().startswith("avx512"), reason="the argmax kernel is AVX-512")
def test_argmax_kernel_refuses_what_it_cannot_read():
    with pytest.raises(RuntimeError, match=r"\(rows, V\) fp32 or bf16"):
        ext.argmax_rows(torch.randn(3, 40).double())
