"""Quantization schemes as small frozen dataclasses that check themselves.

Names follow the field: W8A16 = 8-bit weights, 16/32-bit float activations; W8A8 = both int8.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuili.quant.primitives import check_bits

GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class Int8WeightOnly:
    """W8A16: symmetric int8 weights, one scale per output channel (or per group)."""

    group_size: int | None = None  # None: per output channel

    def __post_init__(self):
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be None (per channel) or one of {GROUP_SIZES}, got {self.group_size}")

    bits = 8
    symmetric = True
    scheme = "w8a16"


@dataclass(frozen=True)
class Int4WeightOnly:
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


@dataclass(frozen=True)
class Int4WeightInt8Activation(Int4WeightOnly):
    """W4A8: W4A16's weights; activations rounded to int8 at run time, one scale per token and weight
    group, so each group's product is an integer dot product (llama.cpp's way to decode Q4 weights
    fast on CPUs: VNNI's int8 multiply-adds do four times the work of fp32 FMAs)."""

    scheme = "w4a8"


@dataclass(frozen=True)
class Int8DynamicActivation:
    """W8A8 dynamic: int8 weights per channel, activations quantized per token at run time."""

    scheme = "w8a8-dynamic"


@dataclass(frozen=True)
class Int8StaticActivation:
    """W8A8 static: one activation scale per layer, fixed from calibration by an observer."""

    observer: str = "minmax"  # see tuili.quant.observers.OBSERVERS

    def __post_init__(self):
        from tuili.quant.observers import OBSERVERS

        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")

    scheme = "w8a8-static"


QuantScheme = Int8WeightOnly | Int4WeightOnly | Int4WeightInt8Activation | Int8DynamicActivation | Int8StaticActivation

SCHEMES: dict[str, type] = {
    c.scheme: c
    for c in (Int8WeightOnly, Int4WeightOnly, Int4WeightInt8Activation, Int8DynamicActivation, Int8StaticActivation)
}


def scheme_from_name(name: str, group_size: int | None = None) -> QuantScheme:
    """'w4a16' or 'w4a8' (with a group size), 'w8a16', 'w8a8-dynamic' or 'w8a8-static' -> a config."""
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}: choose one of {', '.join(SCHEMES)}")
    cls = SCHEMES[name]
    if cls in (Int4WeightOnly, Int4WeightInt8Activation):
        return cls(group_size=group_size or 128)
    if cls is Int8WeightOnly:
        return Int8WeightOnly(group_size=group_size)
    return cls()
