"""`Int8Linear` (W8A8): int8 weights and int8 activations, per-token (dynamic) or per-tensor
(static, from calibration) activation scales. int8 × int8 → int32 runs on a packing of the
weights (AVX-512 VNNI; every batch with AMX tile products), held as the layer's only copy of
them, and in `torch._int_mm` otherwise (large batches without AMX, weights unpacked into a
reused workspace for the call)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from tuili.kernels import dequant
from tuili.kernels import ops as kernels
from tuili.kernels.contract import KernelCall
from tuili.quant.kernel_layer import KernelLinear
from tuili.quant.primitives import QuantizedWeight, quantize_weight


class Int8Linear(KernelLinear):
    """W8A8: y = (q_x · q_wᵀ) · s_x · s_w + b, weights per output channel, activations per token
    (dynamic) or per tensor with a calibrated scale (static)."""

    quant_method = "compressed-tensors"
    _buffer_names = ("qweight", "weight_scale", "input_scale", "bias")
    _row_layout = ("qweight",)  # what the packing holds instead
    qweight: Tensor
    weight_scale: Tensor
    input_scale: Tensor | None

    def __init__(
        self, in_features: int, out_features: int, bias: bool, static: bool, dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("input_scale", torch.ones(()) if static else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: Tensor | None = None) -> Int8Linear:
        """Round-to-nearest int8 weights per output channel."""
        return cls.from_quantized(
            quantize_weight(linear.weight.detach(), 8, "channel", symmetric=True), linear.bias, input_scale
        )

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None, input_scale: Tensor | None = None) -> Int8Linear:
        """From symmetric int8 per-channel codes (RTN or GPTQ)."""
        if qw.bits != 8 or not qw.symmetric or qw.scale.shape[1] != 1:
            raise ValueError("Int8Linear takes symmetric 8-bit weights with one scale per output channel")
        out_features, in_features = qw.q.shape
        layer = cls(
            in_features,
            out_features,
            bias is not None,
            input_scale is not None,
            bias.dtype if bias is not None else torch.float32,
        )
        layer.qweight = qw.q
        layer.weight_scale = qw.scale[:, 0].contiguous()
        if input_scale is not None:
            layer.input_scale = input_scale.float().reshape(())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def static(self) -> bool:
        return self.input_scale is not None

    def dequantize(self) -> Tensor:
        return self._codes(None).float() * self.weight_scale[:, None]

    def _codes(self, out: Tensor | None) -> Tensor:
        """The (out, in) int8 codes, made from the packing where the layer holds only that (into `out`)."""
        call = self.packed_call()
        if call is None:
            return self.qweight
        return kernels.w8a8_unpack(cast(Tensor, call.tensors[0]), self.out_features, self.in_features, out)

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """int8 codes of x (N, in) and their scale, (N, 1) per token or () per tensor."""
        return kernels.quantize_rows(x, self.input_scale)

    def _make_kernel_call(self) -> KernelCall | None:
        held = self.packed_call()
        if held is not None:
            return held
        packed = kernels.w8a8_pack(self.qweight)  # VNNI: the weights repacked, then held only so
        if packed is None:
            return KernelCall.of("w8a8_linear", self.qweight, self.weight_scale, self.input_scale, bias=self.bias)
        call = KernelCall.of(
            "w8a8_linear_packed",
            *packed,
            self.weight_scale,
            self.input_scale,
            ints=(self.out_features,),
            bias=self.bias,
            row_limit=kernels.w8a8_packed_rows(),
        )
        self._keep_only(call)
        return call

    def _unpacked(self, call: KernelCall) -> dict[str, Tensor]:
        return {"qweight": self._codes(None)}  # the packing is still held while it is read

    def _reference(self, rows: Tensor) -> Tensor:
        codes = self._codes(dequant.workspace(self.out_features, self.in_features, torch.int8))
        return kernels.w8a8_gemm(rows, codes, self.weight_scale, self.input_scale)

    def extra_repr(self) -> str:
        mode = "static" if self.static else "dynamic"
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={mode}"
