"""Quantized linear layers with real packed storage.

`WeightOnlyLinear` (W8A16, W4A16): integer weights, float activations; the forward dequantizes
and multiplies (tuili's fused kernels replace this where they are built).
`Int8Linear` (W8A8): int8 weights and int8 activations, per-token (dynamic) or per-tensor
(static, from calibration) activation scales; int8 × int8 → int32 runs in tuili's VNNI kernel
for small batches, in `torch._int_mm` otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuili.kernels import ops as kernels
from tuili.quant.primitives import (
    QuantizedWeight,
    dequantize_groups,
    pack_int4,
    qrange,
    quantize_weight,
    unpack_int4,
)


class WeightOnlyLinear(nn.Module):
    """y = x · dequant(W)ᵀ + b with W stored as 2–8-bit codes (4-bit: two per byte), per-group scales."""

    quant_method = "compressed-tensors"  # how it is saved (tuili.quant.format)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        num_groups = -(-in_features // group_size)
        code = torch.int8 if symmetric else torch.uint8
        cols = -(-in_features // 32) * 16 if bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8 if bits == 4 else code))
        self.register_buffer("scale", torch.ones(out_features, num_groups))
        self.register_buffer("zero", None if symmetric else torch.zeros(out_features, num_groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None) -> WeightOnlyLinear:
        out_features, in_features = qw.q.shape
        layer = cls(in_features, out_features, qw.bits, qw.group_size, qw.symmetric, bias is not None,
                    bias.dtype if bias is not None else torch.float32)
        layer.qweight = pack_int4(qw.q) if qw.bits == 4 else qw.q
        layer.scale = qw.scale.float().contiguous()
        if not qw.symmetric:
            layer.zero = qw.zero.to(torch.uint8)
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int | str, symmetric: bool) -> WeightOnlyLinear:
        """Round-to-nearest quantization of an nn.Linear."""
        return cls.from_quantized(quantize_weight(linear.weight.detach(), bits, group_size, symmetric), linear.bias)

    def codes(self) -> Tensor:
        """(out, in) integer codes, unpacked."""
        if self.bits == 4:
            return unpack_int4(self.qweight, self.in_features, signed=self.symmetric)
        return self.qweight

    def dequantize(self) -> Tensor:
        """The float weight this layer stands for, (out, in) fp32."""
        zero = torch.zeros_like(self.scale) if self.zero is None else self.zero.float()
        return dequantize_groups(self.codes(), self.scale, zero, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > kernels.MAX_M or self.bits not in (4, 8) or (self.bits == 8 and not self.symmetric):
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        if self.bits == 4:
            y = kernels.w4_linear(rows, self.qweight, self.scale, self.zero_offsets(), self.group_size,
                                  flip=self.symmetric)
        else:
            y = kernels.w8_linear(rows, self.qweight, self.scale, self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def zero_offsets(self) -> Tensor:
        """scale · zero per group (symmetric 4-bit: codes flipped to unsigned, zero 8), cached."""
        key = (self.scale.data_ptr(), None if self.zero is None else self.zero.data_ptr())
        if getattr(self, "_zs_key", None) != key:
            zero = torch.full_like(self.scale, 8.0) if self.zero is None else self.zero.float()
            self._zs, self._zs_key = (self.scale * zero).contiguous(), key
        return self._zs

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}")


class Int8Linear(nn.Module):
    """W8A8: y = (q_x · q_wᵀ) · s_x · s_w + b, weights per output channel, activations per token
    (dynamic) or per tensor with a calibrated scale (static)."""

    quant_method = "compressed-tensors"

    def __init__(self, in_features: int, out_features: int, bias: bool, static: bool,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("input_scale", torch.ones(()) if static else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: Tensor | None = None) -> Int8Linear:
        qw = quantize_weight(linear.weight.detach(), 8, "channel", symmetric=True)
        bias = linear.bias
        layer = cls(linear.in_features, linear.out_features, bias is not None, input_scale is not None,
                    bias.dtype if bias is not None else torch.float32)
        layer.qweight = qw.q
        layer.weight_scale = qw.scale[:, 0].contiguous()
        if input_scale is not None:
            layer.input_scale = input_scale.float().reshape(())
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    @property
    def static(self) -> bool:
        return self.input_scale is not None

    def dequantize(self) -> Tensor:
        return self.qweight.float() * self.weight_scale[:, None]

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """int8 codes of x (N, in) and their scale, (N, 1) per token or () per tensor."""
        return kernels.quantize_rows(x, self.input_scale)

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.w8a8_linear(x.reshape(-1, self.in_features), self.qweight, self.weight_scale, self.input_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        mode = "static" if self.static else "dynamic"
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={mode}"
