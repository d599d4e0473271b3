"""The N-major weight layouts of the bf16 dot-product kernels (csrc/qgemm_nmajor.cpp) and of W4A8 on
AVX2 (csrc/w4a8.cpp), and which layers and batches take them: a W4/W8 layer under bf16 activations
is repacked once for the dot products, and `small_batch_rows` says up to which rows this CPU runs
the fp32-activation GEMV faster instead; a W4A8 layer is repacked once where `w4a8_nmajor` says."""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from tuili.kernels.ops import _dequantize, _unpack_w4, extension, native, quantize_groups


def bf16_dot_products() -> bool:
    """Whether weight-only layers under 16-bit activations take the dot-product kernels
    (csrc/qgemm_nmajor.cpp: W4 × bf16 with AVX512-BF16, W8 × int16 with VNNI)."""
    ext = extension()
    return ext is not None and ext.bf16()


@functools.cache
def small_batch_rows(bits: int) -> int:
    """The batch rows up to which the fp32-activation GEMV (w4_linear / w8_linear) runs a W4 or W8
    product faster than the bf16 dot-product kernel on this CPU (0: never), measured once per
    process (about 0.2 s) on an 8192 × 2048 weight. Where the dot products are fast (the Zen 5
    they were written on) it is 0; on an Intel Xeon here the W8 × int16 kernel took 3.5× the GEMV's
    time at one row and half of it at 16, so small batches go to the GEMV. A row count is taken only
    where the GEMV wins by 20%, so that noise does not flip the choice."""
    if not bf16_dot_products():
        return 0
    n, k, group = 8192, 2048, 32  # a 1B model's gate and up projections
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(n, k // group, generator=g) * 0.01 + 0.001
    gemv: tuple[str, tuple]
    dots: tuple[str, tuple]
    if bits == 8:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        packed = pack_w8_i16(w, scale)
        gemv, dots = ("w8_linear", (w, scale, group)), ("w8_linear_i16", (*packed, n, group))
    else:  # any bytes are valid packed codes (two per byte)
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        zs = scale * 8
        packed4 = pack_w4_bf16(w, k, True, scale, zs)
        gemv, dots = ("w4_linear", (w, scale, zs, group, True)), ("w4_linear_bf16", (*packed4, n, group))
    rows = 0
    for m in (1, 2, 4, 8, 16):
        x = torch.randn(m, k, generator=g)
        small, big = (_best_time(native(name), x, *args) for name, args in (gemv, dots))
        if small * 1.2 > big:
            break
        rows = m
    return rows


def w4a8_nmajor() -> bool:
    """Whether W4A8 layers hold their weights in the N-major packing for `w4a8_linear_nmajor`: where
    the kernels are built and the CPU has no AVX-512 VNNI (an AVX2 CPU, or TUILI_ISA=avx2). With
    VNNI the row kernel's vpdpbusd takes them as they are."""
    ext = extension()
    return ext is not None and ext.isa() != "avx512-vnni"


def w4a8_linear_nmajor_reference(
    x: Tensor, packed: Tensor, scale: Tensor, zs: Tensor, n: int, group_size: int, symmetric: bool
) -> Tensor:
    """`w4a8_linear_nmajor` in PyTorch: the activations rounded through int8 per token and group,
    times W = scale · u − zs per group (zs = 8 · scale where `symmetric`), unpacked from the packing."""
    rows = torch.arange(n)
    s = nmajor_groups(scale, rows)
    z = 8 * s if symmetric else nmajor_groups(zs, rows)
    w = _dequantize(nmajor_codes(packed, rows, x.shape[1]), s, z, group_size)
    return (quantize_groups(x, group_size) @ w.T).to(x.dtype)


def _best_time(fn, *args, repeats: int = 5) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def _blocks_of_16(t: Tensor) -> Tensor:
    """(N, ...) padded with zero rows to a multiple of 16, as (N/16, 16, ...)."""
    n = t.shape[0]
    rows = -(-n // 16) * 16
    return torch.cat((t, t.new_zeros(rows - n, *t.shape[1:]))).view(rows // 16, 16, *t.shape[1:])


def _group_vectors(t: Tensor) -> Tensor:
    """Per-group (N, G) values as (N/16, G, 16): the 16 outputs of a block side by side."""
    return _blocks_of_16(t.float()).permute(0, 2, 1).contiguous()


def pack_w4_bf16(w: Tensor, k: int, flip: bool, scale: Tensor, zs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W4 row-packed codes (pack_int4) repacked for `w4_linear_bf16`: (N/16, K'/4, 32) bytes, K' = K
    rounded up to 4, byte j of double pair d holding word j of pair 2d (low nibble) and of pair
    2d + 1 (high), word j = output j/2 at k = 2p + j%2; scales and zs as (N/16, G, 16)."""
    codes = _unpack_w4(w, k, flip)
    kp = -(-k // 4) * 4
    c = _blocks_of_16(F.pad(codes, (0, kp - k)))  # (B, 16 outputs, K')
    c = c.view(c.shape[0], 16, kp // 4, 2, 2).permute(0, 2, 3, 1, 4).reshape(c.shape[0], kp // 4, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).contiguous(), _group_vectors(scale), _group_vectors(zs)


def pack_w8_i16(w: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes (N, K) repacked for `w8_linear_i16`: (N/16, K'/2, 16, 2), pairs of consecutive k
    for 16 outputs side by side (K' = K rounded up to 4); scales as (N/16, G, 16)."""
    k = w.shape[1]
    kp = -(-k // 4) * 4
    c = _blocks_of_16(F.pad(w, (0, kp - k)))
    return c.view(c.shape[0], 16, kp // 2, 2).permute(0, 2, 1, 3).contiguous(), _group_vectors(scale)


def nmajor_codes(packed: Tensor, rows: Tensor, k: int) -> Tensor:
    """The codes (len(rows), K) that `pack_w4_bf16` (uint8, 3 dims: u as the kernel reads it) or
    `pack_w8_i16` (int8, 4 dims) packed, for the given outputs: the inverse of either packing."""
    b, o = rows // 16, rows % 16
    if packed.dim() == 3:  # W4: bytes 2o, 2o + 1 of a double pair: k, k + 1 low, k + 2, k + 3 high
        pairs = packed.view(packed.shape[0], packed.shape[1], 16, 2)[b, :, o]
        return torch.cat((pairs & 15, pairs >> 4), dim=-1).flatten(1)[:, :k]
    return packed[b, :, o].flatten(1)[:, :k]


def nmajor_groups(t: Tensor, rows: Tensor) -> Tensor:
    """Per-group values (len(rows), G) of the given outputs from the (N/16, G, 16) layout."""
    return t[rows // 16, :, rows % 16]
