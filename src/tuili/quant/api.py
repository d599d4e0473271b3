"""`quantize_(model, scheme, method)`: replace a model's nn.Linear layers by quantized ones, in place.

>>> quantize_(model, Int4WeightOnly(group_size=64), GPTQ(), calib=samples)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from tuili.models.model import Model
from tuili.quant.awq import search_clip, search_scale
from tuili.quant.calibration import LayerRunner, input_hooks, require_tuili_model
from tuili.quant.config import (
    Int4WeightInt8Activation,
    Int4WeightOnly,
    Int8DynamicActivation,
    Int8StaticActivation,
    Int8WeightOnly,
    QuantScheme,
)
from tuili.quant.gptq import Hessian, gptq
from tuili.quant.linear import Int8Linear, W4A8Linear, WeightOnlyLinear
from tuili.quant.observers import make_observer
from tuili.quant.primitives import quantize_weight
from tuili.quant.smooth import apply_smoothing, smooth_groups, weight_column_max
from tuili.quant.smoothquant import search_alpha, smoothing_scale


@dataclass(frozen=True)
class RTN:
    """Round to nearest, min-max range per channel or group: no calibration data needed."""

    name = "rtn"


@dataclass(frozen=True)
class GPTQ:
    """GPTQ with damping `damp` (fraction of mean diag H) and lazy blocks. `act_order` (on by default,
    as in llm-compressor) visits columns by decreasing activation energy: on the default model at
    W4A16 g64 it recovers 70% of RTN's perplexity increase against 28% without."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    name = "gptq"

    def __post_init__(self):
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")


@dataclass(frozen=True)
class AWQ:
    """AWQ: activation-aware channel scales searched on a grid of `grid` exponents, then clipping."""

    grid: int = 20
    clip: bool = True
    name = "awq"


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant: s = max|X|^α / max|W|^(1−α) migrates activation outliers into the weights (W8A8).
    `alpha="auto"` searches α per smoothing group for the least int8 output error on calibration
    rows (for static activations it assumes min-max scales, the observer to pair it with)."""

    alpha: float | str = 0.5
    gptq: bool = False  # round the smoothed int8 weights with GPTQ instead of to nearest (llm-compressor's W8A8 recipe)
    name = "smoothquant"

    def __post_init__(self):
        if self.alpha != "auto" and (isinstance(self.alpha, str) or not 0 <= self.alpha <= 1):
            raise ValueError(f"alpha must be in [0, 1] or 'auto', got {self.alpha!r}")


Method = RTN | GPTQ | AWQ | SmoothQuant
METHODS = {m.name: m for m in (RTN, GPTQ, AWQ, SmoothQuant)}
DEFAULT_IGNORE = ("lm_head",)
MAX_SAMPLE_ROWS = 512  # calibration tokens a search (AWQ) looks at per layer
ALPHA_SEARCH_ROWS = 4096  # calibration tokens, drawn from every sample, SmoothQuant's α search looks at
PEAK_ROWS = 64  # ... plus the tokens with the largest activations, which set static scales


def select_linears(
    module: nn.Module,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    where: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, nn.Linear]:
    """nn.Linear layers by name: matching a `targets` pattern (default all), no `ignore` pattern, and `where`."""

    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or name.endswith("." + p) or name == p for p in patterns)

    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
        and (targets is None or matches(name, targets))
        and not matches(name, ignore)
        and (where is None or where(name, m))
    }


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
    _check_combination(scheme, method, calib)
    linears = select_linears(module, targets, ignore, where)
    if not linears:
        raise ValueError("no nn.Linear layer matches targets/ignore/where: nothing to quantize")
    plan = {name: _scheme_for(name, scheme, overrides or {}) for name in linears}
    if (
        isinstance(method, RTN)
        and not isinstance(scheme, Int8StaticActivation)
        and all(not isinstance(s, Int8StaticActivation) for s in plan.values())
    ):
        for name, linear in linears.items():
            replace_module(module, name, quantize_layer(linear, plan[name]))
    else:
        _calibrated(require_tuili_model(module, method.name), linears, plan, method, calib, progress)
    if isinstance(model, Model):
        model.record(
            "quantized",
            scheme=scheme.scheme,
            method=method.name,
            config={k: v for k, v in asdict(scheme).items()},
            layers=len(linears),
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


def check_combination(scheme: QuantScheme, method: Method) -> None:
    """Refuse a method that does not apply to the scheme (GPTQ/AWQ: weight-only; SmoothQuant: W8A8)."""
    weight_only = isinstance(scheme, (Int8WeightOnly, Int4WeightOnly))
    if isinstance(method, (GPTQ, AWQ)) and not weight_only:
        raise ValueError(f"{method.name} quantizes weights only: use it with w4a16 or w8a16, and SmoothQuant for w8a8")
    if isinstance(method, SmoothQuant) and weight_only:
        raise ValueError("SmoothQuant prepares activations for int8: use it with w8a8-dynamic or w8a8-static")


def _check_combination(scheme: QuantScheme, method: Method, calib: Tensor | None) -> None:
    check_combination(scheme, method)
    needs_data = not isinstance(method, RTN) or isinstance(scheme, Int8StaticActivation)
    if needs_data and calib is None:
        raise ValueError(
            f"{method.name} with {scheme.scheme} needs calibration samples: pass calib=(N, T) token ids "
            "(tuili.data.calibration_samples)"
        )


def _scheme_for(name: str, scheme: QuantScheme, overrides: dict[str, QuantScheme]) -> QuantScheme:
    for pattern, override in overrides.items():
        if fnmatch.fnmatchcase(name, pattern) or name.endswith("." + pattern):
            return override
    return scheme


def _weight_args(scheme: QuantScheme) -> tuple[int, int | str, bool]:
    if isinstance(scheme, Int8WeightOnly):
        return 8, scheme.group_size or "channel", True
    return scheme.bits, scheme.group_size, scheme.symmetric


def quantize_layer(linear: nn.Linear, scheme: QuantScheme, input_scale: Tensor | None = None) -> nn.Module:
    """The quantized replacement of one nn.Linear, by round to nearest."""
    if isinstance(scheme, (Int8DynamicActivation, Int8StaticActivation)):
        return Int8Linear.from_float(linear, input_scale)
    return _weight_class(scheme).from_float(linear, *_weight_args(scheme))


def _weight_class(scheme: QuantScheme) -> type[WeightOnlyLinear]:
    return W4A8Linear if isinstance(scheme, Int4WeightInt8Activation) else WeightOnlyLinear


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def _calibrated(
    module: nn.Module,
    linears: dict[str, nn.Linear],
    plan: dict[str, QuantScheme],
    method: Method,
    calib: Tensor,
    progress: bool,
) -> None:
    """Sequential calibration: per decoder layer, gather inputs, (smooth,) quantize, move on."""
    runner = LayerRunner(module, calib)
    for i, layer in runner.layers(f"{method.name} calibration", progress):
        prefix = f"model.layers.{i}."
        local = {n[len(prefix) :]: m for n, m in linears.items() if n.startswith(prefix)}
        if isinstance(method, (AWQ, SmoothQuant)):
            _smooth_layer(runner, layer, local, plan, prefix, method)
        stats = _gather(runner, layer, local, plan, prefix, method)
        for name, linear in local.items():
            replace_module(layer, name, _quantize_calibrated(linear, plan[prefix + name], method, stats[name]))
    rest = {n: m for n, m in linears.items() if not n.startswith("model.layers.")}
    for name, linear in rest.items():  # e.g. lm_head when not ignored: its input is not tracked
        if isinstance(plan[name], Int8StaticActivation):
            raise ValueError(f"{name}: static activation scales are calibrated inside decoder layers only")
        replace_module(module, name, quantize_layer(linear, plan[name]))


def _smooth_layer(runner, layer, local, plan, prefix, method) -> None:
    groups = [g for g in smooth_groups(layer) if any(n in local for n in g.linears)]
    if not groups:
        return
    firsts = {g.first: g.linears[g.first] for g in groups}

    def scheme_of(g) -> QuantScheme:  # the scheme of the group's first quantized linear
        return plan[prefix + next(n for n in g.linears if n in local)]

    if isinstance(method, SmoothQuant):
        _smoothquant_layer(runner, layer, groups, firsts, scheme_of, method.alpha)
        return
    samples = _sample_inputs(runner, layer, firsts)
    for g in groups:
        bits, granularity, symmetric = _weight_args(scheme_of(g))
        group_size = g.linears[g.first].in_features if granularity == "channel" else granularity
        apply_smoothing(g, search_scale(g, samples[g.first], bits, group_size, symmetric, method.grid))


def _smoothquant_layer(runner, layer, groups, firsts, scheme_of, alpha: float | str) -> None:
    """One pass gathers each group's per-channel max |x| (and, for alpha="auto", a uniform sample of
    input rows plus the rows with the largest |x|, which set static scales); then smooth."""
    act_max = {n: torch.zeros(m.in_features) for n, m in firsts.items()}
    rows: dict[str, list[Tensor]] = {n: [] for n in firsts}
    peaks: dict[str, Tensor] = {}
    total = runner.hidden.shape[0] * runner.hidden.shape[1]
    generator = torch.Generator().manual_seed(0)

    def track(name, x):
        x = x.detach().float()
        act_max[name] = torch.maximum(act_max[name], x.abs().amax(0))
        if alpha == "auto":
            keep = max(1, round(x.shape[0] * ALPHA_SEARCH_ROWS / total))
            rows[name].append(x[torch.randperm(x.shape[0], generator=generator)[:keep]])
            both = x if name not in peaks else torch.cat([peaks[name], x])
            peaks[name] = both[both.abs().amax(1).topk(min(PEAK_ROWS, both.shape[0])).indices]

    with input_hooks(firsts, track):
        runner.run(layer)
    for g in groups:
        if alpha == "auto":
            static = isinstance(scheme_of(g), Int8StaticActivation)
            _, s = search_alpha(g, torch.cat(rows[g.first] + [peaks[g.first]]), act_max[g.first], static)
        else:
            s = smoothing_scale(act_max[g.first], weight_column_max(g), alpha)
        apply_smoothing(g, s)


def _sample_inputs(runner, layer, modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    """The first MAX_SAMPLE_ROWS input rows of each module, from one pass over the calibration set."""
    rows: dict[str, list[Tensor]] = {n: [] for n in modules}

    def keep(name, x):
        have = sum(r.shape[0] for r in rows[name])
        if have < MAX_SAMPLE_ROWS:
            rows[name].append(x[: MAX_SAMPLE_ROWS - have].detach().float().clone())

    with input_hooks(modules, keep):
        runner.run(layer)
    return {n: torch.cat(r) for n, r in rows.items()}


def _gather(runner, layer, local, plan, prefix, method) -> dict[str, object]:
    """What each linear's quantizer needs: a Hessian (GPTQ), input samples (AWQ clip), an observer."""
    if isinstance(method, GPTQ):
        hessians = {n: Hessian(m.in_features) for n, m in local.items()}
        with input_hooks(local, lambda name, x: hessians[name].add(x)):
            runner.run(layer)
        return hessians
    if isinstance(method, AWQ):
        return _sample_inputs(runner, layer, local) if method.clip else dict.fromkeys(local)
    static = {
        n: make_observer(plan[prefix + n].observer) for n in local if isinstance(plan[prefix + n], Int8StaticActivation)
    }
    hessians = {n: Hessian(m.in_features) for n, m in local.items() if isinstance(method, SmoothQuant) and method.gptq}

    def observe(name, x):
        if name in static:
            static[name].observe(x)
        if name in hessians:
            hessians[name].add(x)

    if static or hessians:
        with input_hooks({n: local[n] for n in {**static, **hessians}}, observe):
            runner.run(layer)
    return {n: (static.get(n), hessians.get(n)) for n in local}


def _quantize_calibrated(linear: nn.Linear, scheme: QuantScheme, method: Method, stat) -> nn.Module:
    if isinstance(scheme, (Int8DynamicActivation, Int8StaticActivation)):
        observer, hessian = stat
        input_scale = observer.scale() if observer is not None else None
        if hessian is None:
            return Int8Linear.from_float(linear, input_scale)
        qw = gptq(linear.weight.detach().float(), hessian.value(), 8, linear.in_features, True, act_order=True)
        return Int8Linear.from_quantized(qw, linear.bias, input_scale)
    bits, granularity, symmetric = _weight_args(scheme)
    group_size = linear.in_features if granularity == "channel" else granularity
    w = linear.weight.detach().float()
    if isinstance(method, GPTQ):
        qw = gptq(w, stat.value(), bits, group_size, symmetric, method.damp, method.block_size, method.act_order)
        return _weight_class(scheme).from_quantized(qw, linear.bias)
    if isinstance(method, AWQ) and stat is not None:
        clip = search_clip(linear, stat, bits, group_size, symmetric)
        return _weight_class(scheme).from_quantized(quantize_weight(w, bits, group_size, symmetric, clip), linear.bias)
    return quantize_layer(linear, scheme)
