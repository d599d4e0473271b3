"""The C++ quantized GEMV/GEMM kernels against their PyTorch references, on odd shapes too."""

import pytest
import torch

from tuili.kernels import ops
from tuili.kernels.build import extension
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
@pytest.mark.parametrize("n, k, group_size", [(96, 576, 64), (576, 1536, 128), (7, 576, 128), (33, 100, 32),
                                              (5, 577, 32), (8, 64, 64), (17, 130, 130)])
@pytest.mark.parametrize("flip", [False, True])
def test_w4_kernel_matches_reference(m, n, k, group_size, flip):
    w, scale, zs = random_w4(n, k, group_size, flip)
    x = torch.randn(m, k)
    expected = ops.w4_linear_reference(x, w, scale, zs, group_size, flip)
    torch.testing.assert_close(ext.w4_linear(x, w, scale, zs, group_size, flip), expected, atol=1e-3, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("n, k, group_size", [(96, 576, 576), (576, 1536, 1536), (33, 100, 100), (9, 577, 32),
                                              (4, 1536, 64)])
def test_w8_kernel_matches_reference(m, n, k, group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, -(-k // group_size), generator=g) * 0.01
    x = torch.randn(m, k)
    expected = ops.w8_linear_reference(x, w, scale, group_size)
    torch.testing.assert_close(ext.w8_linear(x, w, scale, group_size), expected, atol=1e-3, rtol=1e-4)


@needs_kernels
def test_bad_shapes_are_refused():
    w, scale, zs = random_w4(8, 64, 32, False)
    with pytest.raises(RuntimeError, match="x must be"):
        ext.w4_linear(torch.randn(2, 64).double(), w, scale, zs, 32, False)
    with pytest.raises(RuntimeError, match="w must be"):
        ext.w4_linear(torch.randn(2, 96), w, scale, zs, 32, False)


def test_fallback_is_used_without_the_extension(monkeypatch):
    monkeypatch.setattr(ops, "extension", lambda: None)
    w, scale, zs = random_w4(8, 64, 32, False)
    x = torch.randn(2, 64)
    assert torch.equal(ops.w4_linear(x, w, scale, zs, 32, False), ops.w4_linear_reference(x, w, scale, zs, 32, False))
    assert ops.isa() == "pytorch"
