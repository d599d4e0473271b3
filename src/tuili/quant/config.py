"""Quantization schemes as small frozen dataclasses that check themselves.

Names follow the field: W8A16 = 8-bit weights, 16/32-bit float activations; W8A8 = both int8.
Each scheme knows its weights' format and the layer that holds them, so a method (RTN, GPTQ, AWQ,
SmoothQuant: tuili.quant.methods) only decides how the weights are rounded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from tuili.quant.linear import Int8Linear, W4A8Linear, WeightOnlyLinear
from tuili.quant.primitives import QuantizedWeight, check_bits, quantize_weight

GROUP_SIZES = (32, 64, 128, 256)


class QuantScheme(ABC):
    """What a quantized layer stores and computes; subclasses are frozen dataclasses."""

    scheme: ClassVar[str]  # the name the CLI, recipes and saved checkpoints use
    weight_only: ClassVar[bool] = True  # float (or run-time rounded) activations: weight methods apply
    static: ClassVar[bool] = False  # an activation scale fixed from calibration

    def weight_format(self) -> tuple[int, int | str, bool]:
        """(bits, group size or "channel", symmetric) of the weights."""
        return 8, "channel", True

    def weight_groups(self, in_features: int) -> tuple[int, int, bool]:
        """(bits, group size, symmetric) for a layer of `in_features` inputs (per channel: one group)."""
        bits, group, symmetric = self.weight_format()
        return bits, in_features if group == "channel" else int(group), symmetric

    @abstractmethod
    def from_quantized(self, qw: QuantizedWeight, bias: Tensor | None, input_scale: Tensor | None = None) -> nn.Module:
        """The layer holding weights rounded by any method (and a static input scale)."""

    def from_float(self, linear: nn.Linear, input_scale: Tensor | None = None) -> nn.Module:
        """The layer for `linear`'s weights rounded to nearest."""
        qw = quantize_weight(linear.weight.detach(), *self.weight_format())
        return self.from_quantized(qw, linear.bias, input_scale)


@dataclass(frozen=True)
class Int8WeightOnly(QuantScheme):
    """W8A16: symmetric int8 weights, one scale per output channel (or per group)."""

    group_size: int | None = None  # None: per output channel

    def __post_init__(self):
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be None (per channel) or one of {GROUP_SIZES}, got {self.group_size}")

    bits = 8
    symmetric = True
    scheme = "w8a16"

    def weight_format(self) -> tuple[int, int | str, bool]:
        return 8, self.group_size or "channel", True

    def from_quantized(self, qw: QuantizedWeight, bias: Tensor | None, input_scale: Tensor | None = None) -> nn.Module:
        return WeightOnlyLinear.from_quantized(qw, bias)


@dataclass(frozen=True)
class Int4WeightOnly(QuantScheme):
    """W4A16: 4-bit weights in groups along the input, asymmetric by default (as GPTQ/AWQ checkpoints)."""

    group_size: int = 128
    symmetric: bool = False
    bits: int = 4

    def __post_init__(self):
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        check_bits(self.bits)
        if self.bits > 4:
            raise ValueError(f"Int4WeightOnly takes 2 to 4 bits, got {self.bits}; use Int8WeightOnly for 8")

    scheme = "w4a16"
    layer: ClassVar[type[WeightOnlyLinear]] = WeightOnlyLinear

    def weight_format(self) -> tuple[int, int | str, bool]:
        return self.bits, self.group_size, self.symmetric

    def from_quantized(self, qw: QuantizedWeight, bias: Tensor | None, input_scale: Tensor | None = None) -> nn.Module:
        return self.layer.from_quantized(qw, bias)


@dataclass(frozen=True)
class Int4WeightInt8Activation(Int4WeightOnly):
    """W4A8: W4A16's weights; activations rounded to int8 at run time, one scale per token and weight
    group, so each group's product is an integer dot product (llama.cpp's way to decode Q4 weights
    fast on CPUs: VNNI's int8 multiply-adds do four times the work of fp32 FMAs)."""

    scheme = "w4a8"
    layer: ClassVar[type[WeightOnlyLinear]] = W4A8Linear


class Int8Activations(QuantScheme):
    """W8A8: int8 weights per output channel and int8 activations (`Int8Linear`)."""

    weight_only = False

    def from_quantized(self, qw: QuantizedWeight, bias: Tensor | None, input_scale: Tensor | None = None) -> nn.Module:
        return Int8Linear.from_quantized(qw, bias, input_scale)


@dataclass(frozen=True)
class Int8DynamicActivation(Int8Activations):
    """W8A8 dynamic: int8 weights per channel, activations quantized per token at run time."""

    scheme = "w8a8-dynamic"


@dataclass(frozen=True)
class Int8StaticActivation(Int8Activations):
    """W8A8 static: one activation scale per layer, fixed from calibration by an observer."""

    observer: str = "minmax"  # see tuili.quant.observers.OBSERVERS

    def __post_init__(self):
        from tuili.quant.observers import OBSERVERS

        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")

    scheme = "w8a8-static"
    static = True


SCHEMES: dict[str, type] = {
    c.scheme: c
    for c in (Int8WeightOnly, Int4WeightOnly, Int4WeightInt8Activation, Int8DynamicActivation, Int8StaticActivation)
}


def scheme_from_name(name: str, group_size: int | None = None, symmetric: bool | None = None) -> QuantScheme:
    """'w4a16' or 'w4a8' (with a group size, and symmetric or not; None: the class's default),
    'w8a16', 'w8a8-dynamic' or 'w8a8-static' (always symmetric: `symmetric=False` is refused) -> a config."""
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}: choose one of {', '.join(SCHEMES)}")
    cls = SCHEMES[name]
    if cls in (Int4WeightOnly, Int4WeightInt8Activation):
        return cls(group_size=group_size or 128, **({} if symmetric is None else {"symmetric": symmetric}))
    if symmetric is False:
        raise ValueError(f"{name} has symmetric int8 weights; asymmetric weights are a choice of w4a16 and w4a8")
    if cls is Int8WeightOnly:
        return Int8WeightOnly(group_size=group_size)
    return cls()
