"""Quantized linear layers with real packed storage.

`WeightOnlyLinear` (W8A16, W4A16): integer weights, float activations; the forward dequantizes
and multiplies (tuili's fused kernels replace this where they are built).
`Int8Linear` (W8A8, tuili.quant.int8_linear): int8 weights and int8 activations.
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuili.kernels import dequant, repack
from tuili.kernels import ops as kernels
from tuili.kernels.contract import OPS, KernelCall
from tuili.quant.int8_linear import Int8Linear
from tuili.quant.kernel_layer import COMPUTE_DTYPE, KernelLinear
from tuili.quant.primitives import (
    QuantizedWeight,
    dequantize_groups,
    pack_int4,
    quantize_weight,
    split_groups,
    unpack_int4,
)


class WeightOnlyLinear(KernelLinear):
    """y = x · dequant(W)ᵀ + b with W stored as 2–8-bit codes (4-bit: two per byte), per-group scales.

    Per group W = scale · (codes − zero) with an integer zero point (compressed-tensors' layout), or
    W = scale · codes − offset with a float offset (GGUF's Q4_1 and Q4_K minimums, kept as they are).
    `input_order`: the codes' columns are the inputs in this order (an act-order GPTQ checkpoint's
    groups, made contiguous); the activations are permuted to match, and the C++ decode step leaves
    such a layer to the module forward.

    One copy of the weights: once the layer runs under 16-bit activations on a CPU whose dot-product
    kernels take every batch size (tuili.kernels.repack), its codes, scales and offsets live only in
    those kernels' N-major packing. The row-layout buffers become meta tensors that keep only their
    shapes and dtypes (what analysis reports); reading one (saving, export, the fp32 kernels) puts the row layout
    back in place of the packing (`unpack_`), and the next 16-bit call packs it again."""

    quant_method = "compressed-tensors"  # how it is saved (tuili.quant.format)
    _buffer_names = ("qweight", "scale", "zero", "offset", "input_order", "bias")
    _row_layout = ("qweight", "scale", "offset")  # what the N-major packing holds instead
    qweight: Tensor
    scale: Tensor
    zero: Tensor | None
    offset: Tensor | None
    input_order: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        num_groups = -(-in_features // group_size)
        code = torch.int8 if symmetric else torch.uint8
        cols = -(-in_features // 32) * 16 if bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8 if bits == 4 else code))
        self.register_buffer("scale", torch.ones(out_features, num_groups))
        self.register_buffer("zero", None if symmetric else torch.zeros(out_features, num_groups, dtype=torch.uint8))
        self.register_buffer("offset", None)
        self.register_buffer("input_order", None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_codes(
        cls, codes: Tensor, scale: Tensor, offset: Tensor | None, bits: int, group_size: int
    ) -> WeightOnlyLinear:
        """From codes (out, in) with W = scale · codes − offset per group (no offset: symmetric, signed
        codes), as a GGUF file stores them: no rounding, no float copy."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bits, group_size, offset is None, False)
        layer.zero = None
        layer.qweight = pack_int4(codes) if bits == 4 else codes.to(torch.int8)
        layer.scale = scale.float().contiguous()
        layer.offset = None if offset is None else offset.float().contiguous()
        return layer

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None) -> WeightOnlyLinear:
        out_features, in_features = qw.q.shape
        layer = cls(
            in_features,
            out_features,
            qw.bits,
            qw.group_size,
            qw.symmetric,
            bias is not None,
            bias.dtype if bias is not None else torch.float32,
        )
        layer.qweight = pack_int4(qw.q) if qw.bits == 4 else qw.q
        layer.scale = qw.scale.float().contiguous()
        if not qw.symmetric:
            layer.zero = qw.zero.to(torch.uint8)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int | str, symmetric: bool) -> WeightOnlyLinear:
        """Round-to-nearest quantization of an nn.Linear."""
        return cls.from_quantized(quantize_weight(linear.weight.detach(), bits, group_size, symmetric), linear.bias)

    def codes(self) -> Tensor:
        """(out, in) integer codes, unpacked."""
        return self._stored(None)[0]

    def _stored(self, rows: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Codes (unpacked), scales, zero points and offsets of the given output rows (None: all), as
        stored, from whichever layout the layer holds (the N-major packing is not unpacked for it)."""
        dots = self.packed_call()
        pick = lambda t: t if t is None or rows is None else t[rows]  # noqa: E731
        zero = pick(self.zero)
        if dots is None:
            qweight, scale, offset = pick(self.qweight), pick(self.scale), pick(self.offset)
            codes = unpack_int4(qweight, self.in_features, signed=self.symmetric) if self.bits == 4 else qweight
            return codes, scale, zero, offset
        every = torch.arange(self.out_features) if rows is None else rows
        packed = cast(tuple[Tensor, ...], dots.tensors)  # codes, scales (and scale · zero, for W4)
        codes = repack.nmajor_codes(packed[0], every, self.in_features)
        scale = repack.nmajor_groups(packed[1], every)
        offset = None
        if self.bits == 4 and self._buffers["offset"] is not None:
            offset = repack.nmajor_groups(packed[2], every)  # zs of GGUF's codes is their offset
        elif self.bits == 4 and self.symmetric:
            codes = (codes.to(torch.int16) - 8).to(torch.int8)  # the kernel reads u = code + 8
        return codes, scale, zero, offset

    def dequantize(self) -> Tensor:
        """The float weight this layer stands for, (out, in) fp32, columns in input order."""
        w = self._columns_as_stored()
        if self.input_order is None:
            return w
        unordered = torch.empty_like(w)
        unordered[:, self.input_order] = w
        return unordered

    def _columns_as_stored(self) -> Tensor:
        """The float weight with its columns in the codes' order (input_order's, where set)."""
        return self._dequantize(*self._stored(None))

    def dequantize_rows(self, rows: Tensor) -> Tensor:
        """Rows (len(rows), in) of the float weight, fp32: what an embedding that reads these codes
        looks up, without the whole table in float."""
        return self._dequantize(*self._stored(rows))

    def _dequantize(self, codes: Tensor, scale: Tensor, zero: Tensor | None, offset: Tensor | None) -> Tensor:
        if offset is not None:  # scale · u − offset, in GGUF's order of operations
            groups = split_groups(codes.float(), self.group_size) * scale[..., None] - offset[..., None]
            return groups.flatten(1)[:, : codes.shape[1]]
        zeros = torch.zeros_like(scale) if zero is None else zero.float()
        return dequantize_groups(codes, scale, zeros, self.group_size)

    def _make_kernel_call(self) -> KernelCall | None:
        if self.bits == 4:
            if self.offset is not None:
                zs = self.offset  # scale · zero, given as such
            else:
                zero = torch.full_like(self.scale, 8.0) if self.zero is None else self.zero.float()
                zs = (self.scale * zero).contiguous()  # scale · zero per group (symmetric: codes flipped, zero 8)
            flip = self.symmetric and self.offset is None
            ints = (self.group_size, flip)
            return KernelCall.of("w4_linear", self.qweight, self.scale, zs, ints=ints, bias=self.bias)
        if self.bits == 8 and self.symmetric and (self.group_size % 32 == 0 or self.group_size >= self.in_features):
            return KernelCall.of("w8_linear", self.qweight, self.scale, ints=(self.group_size,), bias=self.bias)
        return None

    def _make_bf16_kernel_call(self) -> KernelCall | None:
        # the codes repacked N-major on the first bf16 call; the row layout then gives way to it
        # unless this CPU runs small batches on the row layout's GEMV (both are kept there)
        packed = self.packed_call()
        if packed is not None:
            return packed
        call = self.kernel_call()
        if not repack.bf16_dot_products() or (self.group_size % 4 and self.group_size < self.in_features):
            return call
        ints = (self.out_features, self.group_size)
        if self.bits == 4 and call is not None:
            qweight, scale, zs = cast(tuple[Tensor, Tensor, Tensor], call.tensors)  # codes, scales, scale · zero
            w4 = repack.pack_w4_bf16(qweight, self.in_features, bool(call.ints[1]), scale, zs)
            dots = KernelCall.of("w4_linear_bf16", *w4, ints=ints, bias=self.bias)
        elif self.bits == 8 and self.symmetric:  # int16 activations: one widening per 32 codes, not int8 → bf16
            w8 = repack.pack_w8_i16(self.qweight, self.scale)
            dots = KernelCall.of("w8_linear_i16", *w8, ints=ints, bias=self.bias)
        else:
            return call
        rows = repack.small_batch_rows(self.bits) if call is not None else 0
        if rows:
            return replace(dots, small=call, small_rows=rows)
        self._keep_only(dots)
        return dots

    def _unpacked(self, call: KernelCall) -> dict[str, Tensor]:
        codes, scale, _, offset = self._stored(None)
        rows = {"qweight": pack_int4(codes) if self.bits == 4 else codes, "scale": scale}
        return rows | ({"offset": offset} if offset is not None else {})

    def _reference(self, rows: Tensor) -> Tensor:
        dtype = COMPUTE_DTYPE.get() or rows.dtype
        return F.linear(self._activations(rows).to(dtype), self.weight_as(dtype)).to(rows.dtype)

    def weight_as(self, dtype: torch.dtype) -> Tensor:
        """The float weight in `dtype` for one GEMM (columns in the codes' order): made in one pass
        by tuili's dequantize kernels from the codes the fp32 kernel call reads, into this thread's
        reused workspace (so it is valid until the next call), else through PyTorch. At prefill
        making the weight is what costs: PyTorch's unpacking took ~90% of a 1B model's prefill."""
        dots = self.packed_call()
        if dots is not None:  # the layer holds only the dot-product kernels' packing
            return self._nmajor_weight(dots, dtype)
        call = self.kernel_call() if kernels.extension() is not None else None
        if call is None or dtype not in (torch.float32, torch.bfloat16):
            return self._columns_as_stored().to(dtype)
        out = dequant.workspace(self.out_features, self.in_features, dtype)
        bf16 = dtype == torch.bfloat16
        if call.op.name in ("w4_linear", "w4a8_linear"):
            w, scale, zs = cast(tuple[Tensor, Tensor, Tensor], call.tensors)
            group, flip = call.ints
            return dequant.dequantize_w4(w, scale, zs, self.in_features, group, bool(flip), bf16, out)
        if call.op.name == "w8_linear":
            w, scale = cast(tuple[Tensor, Tensor], call.tensors)
            return dequant.dequantize_w8(w, scale, self.group_size, bf16, out)
        return self._columns_as_stored().to(dtype)

    def _nmajor_weight(self, dots: KernelCall, dtype: torch.dtype) -> Tensor:
        """weight_as from the N-major packing, without unpacking it."""
        whole_groups = self.group_size % 16 == 0 or self.group_size >= self.in_features
        if kernels.extension() is None or dtype not in (torch.float32, torch.bfloat16) or not whole_groups:
            return self._columns_as_stored().to(dtype)
        packed, scale = cast(tuple[Tensor, Tensor], dots.tensors[:2])
        zs = dots.tensors[2] if self.bits == 4 else None
        n, k = self.out_features, self.in_features
        out = dequant.workspace(n, k, dtype)
        return dequant.dequantize_nmajor(packed, scale, zs, n, k, self.group_size, dtype == torch.bfloat16, out)

    def _activations(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
        )


class W4A8Linear(WeightOnlyLinear):
    """W4A16's packed weights with activations rounded to int8 per token and weight group at run
    time. With VNNI: tuili's integer kernel on the row layout up to 64 rows, the same rounding then a
    float GEMM above. Without (AVX2): the weights repacked N-major once and held only so, and the
    integer kernel for every batch, which outruns dequantize + sgemm there (kernels/contract.py)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype = torch.float32,
    ):
        if bits != 4 or group_size % 32:
            raise ValueError(
                f"W4A8 takes 4-bit weights in groups of a multiple of 32, got {bits} bits, group size {group_size}"
            )
        super().__init__(in_features, out_features, bits, group_size, symmetric, bias, dtype)

    def _make_kernel_call(self) -> KernelCall | None:
        held = self.packed_call()
        if held is not None:
            return held
        call = super()._make_kernel_call()
        if call is None or not repack.w4a8_nmajor():
            return None if call is None else replace(call, op=OPS["w4a8_linear"])
        qweight, scale, zs = cast(tuple[Tensor, Tensor, Tensor], call.tensors)
        group, flip = call.ints
        codes, scales, zss = repack.pack_w4_bf16(qweight, self.in_features, bool(flip), scale, zs)
        if flip:  # symmetric: zs = 8 · scale, unread by the kernel; its slot shares the scales' storage
            zss = scales
        ints = (self.out_features, group, flip)
        nmajor = KernelCall.of("w4a8_linear_nmajor", codes, scales, zss, ints=ints, bias=self.bias)
        self._keep_only(nmajor)  # then held only so
        return nmajor

    def _nmajor_weight(self, dots: KernelCall, dtype: torch.dtype) -> Tensor:
        if dots.ints[2]:  # symmetric: zs derived from the scales the packing holds in its place
            packed, scale = cast(tuple[Tensor, Tensor], dots.tensors[:2])
            dots = replace(dots, tensors=(packed, scale, 8 * scale))
        return super()._nmajor_weight(dots, dtype)

    def _make_bf16_kernel_call(self) -> KernelCall | None:
        return self.kernel_call()  # W4A8 rounds activations to int8 whatever their dtype

    def _activations(self, rows: Tensor) -> Tensor:
        return kernels.quantize_groups(rows, self.group_size).to(rows.dtype)


class QuantizedEmbedding(nn.Module):
    """An embedding table that is a tied head's codes: each looked-up row is dequantized, so the
    table is held once, quantized (a GGUF file's token_embd kept as it is). It has no state of its
    own; `table()` gives the float table where a format needs one (a Hugging Face folder)."""

    head: WeightOnlyLinear

    def __init__(self, head: WeightOnlyLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: its codes are the head's, saved once, there
        self.num_embeddings, self.embedding_dim, self.dtype = head.out_features, head.in_features, dtype

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.head.dequantize_rows(ids.reshape(-1)).to(self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def table(self) -> Tensor:
        return self.head.dequantize().to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, codes of the head ({self.head.bits}-bit)"


def quantized_layers(module: nn.Module) -> list[str]:
    """Names of the quantized linear layers in `module` (they hold integer weights and cannot be
    pruned structurally or trained)."""
    return [n for n, m in module.named_modules() if isinstance(m, (Int8Linear, W4A8Linear, WeightOnlyLinear))]
