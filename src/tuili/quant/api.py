"""`quantize_(model, scheme, method)`: replace a model's nn.Linear layers by quantized ones, in place.

>>> quantize_(model, Int4WeightOnly(group_size=64), GPTQ(), calib=samples)

The scheme (tuili.quant.config) says what the layers store; the method (a config registered to its
handler in tuili.quant.methods) how their weights are rounded. Methods that need data run one
decoder layer at a time (tuili.models.layerwise).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch
from torch import Tensor, nn

from tuili.models.layerwise import LayerRunner, require_tuili_model
from tuili.models.lazy import onload_for
from tuili.models.memory import return_freed_memory
from tuili.models.model import Model
from tuili.models.selection import DEFAULT_IGNORE, replace_module, select_linears
from tuili.quant.awq import AWQ
from tuili.quant.config import Int8WeightOnly, QuantScheme
from tuili.quant.gptq import GPTQ
from tuili.quant.methods import METHODS, RTN, MethodHandler, handler_for
from tuili.quant.smoothquant import SmoothQuant

__all__ = ["AWQ", "GPTQ", "METHODS", "RTN", "SmoothQuant", "lm_head_plan", "quantize_", "quantize_layer"]
Method = RTN | GPTQ | AWQ | SmoothQuant


def quantize_(
    model: Model | nn.Module,
    scheme: QuantScheme,
    method: Method = RTN(),
    *,
    calib: Tensor | None = None,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    where: Callable[[str, nn.Module], bool] | None = None,
    overrides: dict[str, QuantScheme] | None = None,
    progress: bool = True,
) -> Model | nn.Module:
    """Quantize the selected nn.Linear layers of `model` in place and return it.

    Args:
        scheme: Int8WeightOnly, Int4WeightOnly, Int4WeightInt8Activation, Int8DynamicActivation or
            Int8StaticActivation.
        method: RTN (default), GPTQ or AWQ (weight-only), SmoothQuant (W8A8).
        calib: (N, T) token ids; needed by GPTQ, AWQ, SmoothQuant and static activations.
        overrides: name pattern -> scheme, for mixed precision (first match wins).
    """
    module = model.module if isinstance(model, Model) else model
    handler = handler_for(method)
    handler.check(scheme)
    linears = select_linears(module, targets, ignore, where)
    if not linears:
        raise ValueError("no nn.Linear layer matches targets/ignore/where: nothing to quantize")
    plan = {name: _scheme_for(name, scheme, overrides or {}) for name in linears}
    if not handler.needs_data(list(plan.values())):
        for name in list(linears):  # in layer order; each float layer dropped once replaced
            onload_for(module, name)
            replace_module(module, name, quantize_layer(linears.pop(name), plan[name]))
    elif calib is None:
        raise ValueError(
            f"{handler.name} with {scheme.scheme} needs calibration samples: pass calib=(N, T) token ids "
            "(tuili.data.calibration_samples)"
        )
    else:
        _calibrated(require_tuili_model(module, handler.name), linears, plan, handler, calib, progress)
    if isinstance(model, Model):
        model.record(
            "quantized",
            scheme=scheme.scheme,
            method=handler.name,
            config=asdict(scheme),  # type: ignore[call-overload]
            layers=len(plan),
            ignore=list(ignore),
        )
    return model


LM_HEADS = ("float", "int8", "same")


def lm_head_plan(lm_head: str, ignore: Sequence[str] = DEFAULT_IGNORE) -> tuple[list[str], dict | None]:
    """`quantize_`'s ignore and overrides for the language-model head: kept float (the field's
    default), int8 weight-only (decoding reads it every token), or quantized like the rest ("same")."""
    if lm_head not in LM_HEADS:
        raise ValueError(f"lm_head must be one of {', '.join(LM_HEADS)}, got {lm_head!r}")
    kept = [name for name in ignore if name != "lm_head" or lm_head == "float"]
    return kept, ({"lm_head": Int8WeightOnly()} if lm_head == "int8" else None)


def _scheme_for(name: str, scheme: QuantScheme, overrides: dict[str, QuantScheme]) -> QuantScheme:
    for pattern, override in overrides.items():
        if fnmatch.fnmatchcase(name, pattern) or name.endswith("." + pattern):
            return override
    return scheme


def quantize_layer(linear: nn.Linear, scheme: QuantScheme, input_scale: Tensor | None = None) -> nn.Module:
    """The quantized replacement of one nn.Linear, by round to nearest."""
    return scheme.from_float(linear, input_scale)


def _quantize_decoder_layer(
    runner: LayerRunner,
    layer: nn.Module,
    local: dict[str, nn.Linear],
    plan: dict[str, QuantScheme],
    handler: MethodHandler,
    prefix: str,
) -> None:
    """(Smooth,) gather what the method needs from the layer's inputs, and quantize its linears."""
    schemes = {n: plan[prefix + n] for n in local}
    handler.smooth(runner, layer, local, schemes)
    stats = handler.gather(runner, layer, local, schemes)
    for name in list(local):
        linear, stat = local.pop(name), stats.pop(name)  # each float weight and statistic freed once used
        if stat.rows == 0:  # a mixture's expert that no calibration token was routed to
            if schemes[name].static:
                raise ValueError(
                    f"{prefix}{name} saw no calibration tokens, so it has no static activation scale: "
                    "give more calibration samples, or use dynamic activations"
                )
            replace_module(layer, name, quantize_layer(linear, schemes[name]))  # round to nearest
        else:
            replace_module(layer, name, handler.quantize(linear, schemes[name], stat))
        del linear, stat
        return_freed_memory()


@torch.no_grad()
def _calibrated(
    module: nn.Module,
    linears: dict[str, nn.Linear],
    plan: dict[str, QuantScheme],
    handler: MethodHandler,
    calib: Tensor,
    progress: bool,
) -> None:
    """Sequential calibration: per decoder layer, (smooth,) gather what the method needs, quantize."""
    runner = LayerRunner(module, calib)  # type: ignore[arg-type]
    for i, layer in runner.layers(f"{handler.name} calibration", progress):
        prefix = f"model.layers.{i}."
        # taken out of `linears` and held by _quantize_decoder_layer's frame alone, so that each float
        # layer is freed once replaced (a lazy model holds one float decoder layer at a time)
        local = [n for n in linears if n.startswith(prefix)]
        _quantize_decoder_layer(runner, layer, {n[len(prefix) :]: linears.pop(n) for n in local}, plan, handler, prefix)
    rest = {n: m for n, m in linears.items() if not n.startswith("model.layers.")}
    for name, linear in rest.items():  # e.g. lm_head when not ignored: its input is not tracked
        if plan[name].static:
            raise ValueError(f"{name}: static activation scales are calibrated inside decoder layers only")
        replace_module(module, name, quantize_layer(linear, plan[name]))
