"""Quantized weights to float for one GEMM: what a W4/W8 layer multiplies by above its kernels' rows
(prefill chunks, large batches), written in one pass (csrc/dequant.cpp) into a reused workspace."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from tuili.kernels.ops import _dequantize, _run, _unpack_w4
from tuili.kernels.repack import nmajor_codes, nmajor_groups


def dequantize_w4_reference(
    w: Tensor, scale: Tensor, zs: Tensor, k: int, group_size: int, flip: bool, bf16: bool = False, out=None
) -> Tensor:
    """The float weight (N, K) of packed W4 codes: scale · u − zs per group, fp32 or rounded to bf16
    (into `out` where given)."""
    w = _dequantize(_unpack_w4(w, k, flip), scale, zs, group_size)
    return _into(w.to(torch.bfloat16) if bf16 else w, out)


def dequantize_w4(
    w: Tensor, scale: Tensor, zs: Tensor, k: int, group_size: int, flip: bool, bf16: bool = False, out=None
) -> Tensor:
    return _run("dequantize_w4", dequantize_w4_reference, w, scale, zs, k, group_size, flip, bf16, out)


def dequantize_w8_reference(w: Tensor, scale: Tensor, group_size: int, bf16: bool = False, out=None) -> Tensor:
    """The float weight (N, K) of int8 codes: scale · q per group, fp32 or rounded to bf16 (into `out`)."""
    w = _dequantize(w, scale, torch.zeros_like(scale), group_size)
    return _into(w.to(torch.bfloat16) if bf16 else w, out)


def dequantize_w8(w: Tensor, scale: Tensor, group_size: int, bf16: bool = False, out=None) -> Tensor:
    return _run("dequantize_w8", dequantize_w8_reference, w, scale, group_size, bf16, out)


def dequantize_nmajor_reference(
    packed: Tensor, scale: Tensor, zs: Tensor | None, n: int, k: int, group_size: int, bf16: bool = False, out=None
) -> Tensor:
    """The float weight (N, K) of the 16-bit dot-product kernels' N-major packing (tuili.kernels.repack):
    W4 (zs given) scale · u − zs per group, W8 scale · q; fp32 or rounded to bf16 (into `out`)."""
    rows = torch.arange(n)
    scales = nmajor_groups(scale, rows)
    zeros = torch.zeros_like(scales) if zs is None else nmajor_groups(zs, rows)
    w = _dequantize(nmajor_codes(packed, rows, k), scales, zeros, group_size)
    return _into(w.to(torch.bfloat16) if bf16 else w, out)


def dequantize_nmajor(
    packed: Tensor, scale: Tensor, zs: Tensor | None, n: int, k: int, group_size: int, bf16: bool = False, out=None
) -> Tensor:
    return _run("dequantize_nmajor", dequantize_nmajor_reference, packed, scale, zs, n, k, group_size, bf16, out)


def _into(x: Tensor, out: Tensor | None) -> Tensor:
    return x if out is None else out.copy_(x)


_WORKSPACE = threading.local()
WORKSPACE_LIMIT = 160 * 2**20  # an 8B model's MLP weight in bf16 fits; a larger ask gets its own tensor


def workspace(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """A (rows, cols) scratch tensor of this thread, reused from call to call and grown to the
    largest size asked for (up to WORKSPACE_LIMIT bytes): one layer's weight dequantized for a
    GEMM, written into pages already mapped (a fresh 30 MB tensor costs more in page faults than the
    dequantization itself). It is overwritten by the next call in the same thread."""
    buffer = getattr(_WORKSPACE, "buffer", None)
    need = rows * cols * dtype.itemsize
    if need > WORKSPACE_LIMIT:
        return torch.empty(rows, cols, dtype=dtype)
    if buffer is None or buffer.numel() < need:
        buffer = _WORKSPACE.buffer = torch.empty(need, dtype=torch.uint8)
    return buffer[:need].view(dtype).view(rows, cols)
