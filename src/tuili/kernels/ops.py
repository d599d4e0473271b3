"""Entry points of tuili's kernels, each beside its plain PyTorch reference.

`w4_linear` and `w8_linear` compute y = x · dequant(W)ᵀ for the packed layouts of
`tuili.quant.primitives` (see csrc/qgemv.cpp); the C++ path runs for small M (decoding), where
reading the codes once matters, and the reference is what tests hold it to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tuili.kernels.build import extension

MAX_M = 16  # above this, dequantize once and let the BLAS GEMM reuse the weights across rows


def available() -> bool:
    return extension() is not None


def isa() -> str:
    ext = extension()
    return ext.isa() if ext is not None else "pytorch"


def _unpack_w4(w: Tensor, cols: int, flip: bool) -> Tensor:
    chunks = w.view(w.shape[0], -1, 16)
    codes = torch.cat((chunks & 0xF, chunks >> 4), dim=-1).flatten(1)[:, :cols]  # (N, K) unsigned
    return codes ^ 8 if flip else codes


def _dequantize(codes: Tensor, scale: Tensor, zs: Tensor, group_size: int) -> Tensor:
    n, k = codes.shape
    g = scale.shape[1]
    padded = F.pad(codes.float(), (0, g * group_size - k)).view(n, g, group_size)
    return (padded * scale[..., None] - zs[..., None]).flatten(1)[:, :k]


def w4_linear_reference(x: Tensor, w: Tensor, scale: Tensor, zs: Tensor, group_size: int, flip: bool) -> Tensor:
    """(M, K) fp32 · dequant((N, K/2) packed codes)ᵀ with W = scale · u − zs per group."""
    return x @ _dequantize(_unpack_w4(w, x.shape[1], flip), scale, zs, group_size).T


def w8_linear_reference(x: Tensor, w: Tensor, scale: Tensor, group_size: int) -> Tensor:
    return x @ _dequantize(w, scale, torch.zeros_like(scale), group_size).T


def w4_linear(x: Tensor, w: Tensor, scale: Tensor, zs: Tensor, group_size: int, flip: bool) -> Tensor:
    ext = extension()
    if ext is None or x.shape[0] > MAX_M or x.device.type != "cpu":
        return w4_linear_reference(x.float(), w, scale, zs, group_size, flip)
    return ext.w4_linear(x.float().contiguous(), w, scale, zs, group_size, flip)


def w8_linear(x: Tensor, w: Tensor, scale: Tensor, group_size: int) -> Tensor:
    ext = extension()
    if ext is None or x.shape[0] > MAX_M or x.device.type != "cpu":
        return w8_linear_reference(x.float(), w, scale, group_size)
    return ext.w8_linear(x.float().contiguous(), w, scale, group_size)
