"""Quantization: maths, observers, quantized linear layers, RTN · GPTQ · AWQ · SmoothQuant."""

from tuili.models.selection import select_linears
from tuili.quant import format as _format  # noqa: F401 - registers the compressed-tensors checkpoint format
from tuili.quant import gptq_awq_format as _gptq_awq  # noqa: F401 - registers GPTQ and AWQ checkpoints (read)
from tuili.quant.api import AWQ, GPTQ, METHODS, RTN, SmoothQuant, quantize_
from tuili.quant.config import (
    Int4WeightInt8Activation,
    Int4WeightOnly,
    Int8DynamicActivation,
    Int8StaticActivation,
    Int8WeightOnly,
    scheme_from_name,
)
from tuili.quant.kv import quantize_kv_cache_
from tuili.quant.linear import Int8Linear, W4A8Linear, WeightOnlyLinear

__all__ = [
    "AWQ",
    "GPTQ",
    "METHODS",
    "RTN",
    "Int4WeightInt8Activation",
    "Int4WeightOnly",
    "Int8DynamicActivation",
    "Int8Linear",
    "Int8StaticActivation",
    "Int8WeightOnly",
    "SmoothQuant",
    "W4A8Linear",
    "WeightOnlyLinear",
    "quantize_",
    "quantize_kv_cache_",
    "scheme_from_name",
    "select_linears",
]
