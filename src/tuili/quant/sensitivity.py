"""Quantization error analysis, layer by layer: how much each layer's weight and output change when
it alone is quantized, and what that does to perplexity (a sensitivity ranking for mixed precision)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from tuili.data.perplexity import perplexity
from tuili.models.layerwise import input_hooks
from tuili.models.model import Model
from tuili.models.selection import replace_module, select_linears
from tuili.quant.api import quantize_layer
from tuili.quant.config import QuantScheme
from tuili.quant.observers import make_observer
from tuili.quant.primitives import mse, sqnr

MAX_ROWS = 2048  # calibration tokens kept per layer for the output error


@dataclass(frozen=True)
class LayerError:
    name: str
    weight_sqnr: float  # dB, dequantized weight against the float weight
    output_mse: float  # on calibration inputs
    output_sqnr: float  # dB
    perplexity_delta: float | None  # perplexity with only this layer quantized, minus the float one

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def layer_errors(
    model: Model,
    scheme: QuantScheme,
    calib: Tensor,
    eval_windows: Tensor | None = None,
    ignore: tuple[str, ...] = ("lm_head",),
    progress: bool = True,
) -> list[LayerError]:
    """One row per selected linear layer, most sensitive first (by perplexity change when measured,
    else by output SQNR). Each layer is quantized with RTN on its own; the model is left unchanged."""
    module = model.module
    linears = select_linears(module, ignore=ignore)
    inputs: dict[str, list[Tensor]] = {n: [] for n in linears}

    def keep(name, x):
        if sum(t.shape[0] for t in inputs[name]) < MAX_ROWS:
            inputs[name].append(x.detach().float().clone())

    with input_hooks(linears, keep):
        module(calib)
    base = perplexity(module, eval_windows, progress=False).perplexity if eval_windows is not None else None
    rows = []
    for name, linear in tqdm(
        linears.items(), desc="layer sensitivity", unit="layer", disable=not progress, leave=False
    ):
        x = torch.cat(inputs[name])[:MAX_ROWS]
        quantized = quantize_layer(linear, scheme, _static_scale(scheme, x))
        ref, out = linear(x), quantized(x)
        delta = None
        if eval_windows is not None:
            replace_module(module, name, quantized)
            delta = perplexity(module, eval_windows, progress=False).perplexity - (base or 0.0)
            replace_module(module, name, linear)
        weight_sqnr = sqnr(linear.weight, quantized.dequantize())  # type: ignore[operator]
        rows.append(LayerError(name, weight_sqnr, mse(ref, out), sqnr(ref, out), delta))
    key = (lambda r: -r.perplexity_delta) if eval_windows is not None else (lambda r: r.output_sqnr)
    return sorted(rows, key=key)


def _static_scale(scheme: QuantScheme, x: Tensor) -> Tensor | None:
    if not scheme.static:
        return None
    observer = make_observer(scheme.observer)  # type: ignore[attr-defined]
    observer.observe(x)
    return observer.scale()
