"""Quantization maths as pure tensor functions: ranges, scales and zero points, (de)quantization,
4-bit packing and error metrics. Nothing here knows about modules or models.

Symmetric, n bits:  scale = max|x| / (2^(n−1) − 1),  zero = 0,  q ∈ [−(2^(n−1) − 1), 2^(n−1) − 1]
Asymmetric, n bits: scale = (max − min) / (2^n − 1), zero = round(−min / scale), q ∈ [0, 2^n − 1]
x ≈ (q − zero) · scale. The range always includes 0, so 0 is exact (padding and ReLU zeros stay 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tuili.kernels.ops import unpack_nibbles

Granularity = str | int  # "tensor", "channel" (one scale per output row) or a group size along the input


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")


def qparams(xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point for values in [xmin, xmax] (elementwise over groups)."""
    qmin, qmax = qrange(bits, symmetric)
    xmin, xmax = xmin.clamp(max=0).float(), xmax.clamp(min=0).float()
    if symmetric:
        scale = torch.maximum(-xmin, xmax) / qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (xmax - xmin) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    if not symmetric:
        zero = (qmin - xmin / scale).round().clamp(qmin, qmax)
    return scale, zero


def quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Integer codes round(x / scale) + zero, clamped to the range (int8 or uint8)."""
    qmin, qmax = qrange(bits, symmetric)
    q = (x.float() / scale).round() + zero
    return q.clamp(qmin, qmax).to(torch.int8 if symmetric else torch.uint8)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (q.float() - zero) * scale


def fake_quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Quantize then dequantize: the float values a quantized tensor stands for."""
    return dequantize(quantize(x, scale, zero, bits, symmetric), scale, zero).to(x.dtype)


# ---- weights in groups ------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """Integer codes (out, in) with a scale and zero point per (row, group)."""

    q: Tensor  # (out, in) int8 (symmetric) or uint8 (asymmetric)
    scale: Tensor  # (out, num_groups) fp32
    zero: Tensor  # (out, num_groups) fp32 holding integers
    bits: int
    group_size: int  # columns per group; the last group may be shorter
    symmetric: bool

    def dequantize(self) -> Tensor:
        return dequantize_groups(self.q, self.scale, self.zero, self.group_size)


def group_size_of(granularity: Granularity, shape: tuple[int, ...]) -> int:
    """Columns per group for a (out, in) weight: "channel" is one group per row."""
    rows, cols = shape
    if granularity == "channel":
        return cols
    if granularity == "tensor":
        raise ValueError("per-tensor scales apply to activations; weights use 'channel' or a group size")
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"group size must be a positive integer, 'channel' or 'tensor', got {granularity!r}")
    if granularity > cols:
        raise ValueError(f"group size {granularity} is larger than the row ({cols} columns)")
    return granularity


def split_groups(w: Tensor, group_size: int) -> Tensor:
    """(out, in) -> (out, num_groups, group_size), the last group padded with zeros.

    Zero padding never changes a group's range, because every range includes 0.
    """
    rows, cols = w.shape
    num_groups = math.ceil(cols / group_size)
    return F.pad(w, (0, num_groups * group_size - cols)).view(rows, num_groups, group_size)


def quantize_weight(
    w: Tensor, bits: int, granularity: Granularity, symmetric: bool, clip: Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of a (out, in) weight, min-max range per row or group;
    `clip` (out, num_groups) shrinks each group's range (AWQ's clipping search)."""
    check_finite(w, "weight")
    group_size = group_size_of(granularity, tuple(w.shape))
    groups = split_groups(w.float(), group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale, zero = qparams(lo, hi, bits, symmetric)
    return quantize_weight_with(w, scale, zero, bits, group_size, symmetric)


def quantize_weight_with(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, symmetric: bool
) -> QuantizedWeight:
    """Quantize `w` with given per-group scales and zero points (from a search or GPTQ)."""
    cols = w.shape[1]
    groups = split_groups(w.float(), group_size)
    q = quantize(groups, scale[..., None], zero[..., None], bits, symmetric)
    return QuantizedWeight(q.flatten(1)[:, :cols].contiguous(), scale, zero, bits, group_size, symmetric)


def dequantize_groups(q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """(out, in) float weight from codes and per-group parameters."""
    cols = q.shape[1]
    groups = split_groups(q.float(), group_size)
    return dequantize(groups, scale[..., None], zero[..., None]).flatten(1)[:, :cols]


# ---- 4-bit packing ----------------------------------------------------------------------------


def pack_int4(q: Tensor) -> Tensor:
    """Two 4-bit codes per byte, in chunks of 32 codes per 16 bytes along the last dim: byte j of a
    chunk holds code j (low nibble) and code j + 16 (high nibble), as llama.cpp's Q4 blocks do, so a
    SIMD kernel meets 16 contiguous activations per nibble half. The last chunk is zero-padded."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    cols = u.shape[-1]
    u = F.pad(u, (0, -cols % 32)).unflatten(-1, (-1, 2, 16))  # (..., chunks, 2, 16)
    return (u[..., 0, :] | (u[..., 1, :] << 4)).flatten(-2)


def unpack_int4(packed: Tensor, cols: int, signed: bool) -> Tensor:
    """Inverse of `pack_int4`: (…, ceil(cols/32)·16) bytes -> (…, cols) int8 (signed) or uint8 codes."""
    u = unpack_nibbles(packed, cols)
    if not signed:
        return u
    s = u.to(torch.int8)
    return torch.where(s > 7, s - 16, s)


# ---- errors -----------------------------------------------------------------------------------


def check_finite(x: Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} has {bad} NaN or Inf values: quantization needs finite numbers")


def mse(reference: Tensor, approx: Tensor) -> float:
    return (reference.float() - approx.float()).pow(2).mean().item()


def sqnr(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 · log10(Σ x² / Σ (x − x̂)²)."""
    noise = (reference.float() - approx.float()).pow(2).sum().item()
    signal = reference.float().pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise)


def max_abs_error(reference: Tensor, approx: Tensor) -> float:
    return (reference.float() - approx.float()).abs().max().item()
