"""`tuili search`: the per-layer formats that meet a budget with the least quality lost.

Each linear layer may stay float or become int8 or int4 (tuili.pipeline.sensitivity.OPTIONS), at a
measured cost (bytes, or batch-1 seconds) and a predicted loss increase. Choosing one option per
layer to minimise Σ ΔL subject to Σ cost ≤ budget is a multiple-choice knapsack, which `plan`
solves (tuili.pipeline.knapsack). The plan is then applied and measured: a budget is reported met
only when the measurement says so.

Sparsity: the search also tries removing a fraction of every MLP's intermediate neurons first
(structured pruning, activation importance: tuili.prune.structured), the one kind of sparsity that
makes a model smaller and faster on a CPU without sparse kernels, and that the Hugging Face format
keeps (one intermediate size for every layer, so the fraction is the model's, not each layer's).
Each fraction gets its own sensitivities and plan; the plans are measured and the one that meets
the budget with the lowest measured perplexity wins.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Sequence

from tuili.data import calibration_samples, eval_windows, load_text, perplexity
from tuili.kernels.kv_format import check_kv_cache_format
from tuili.models.model import Model
from tuili.pipeline.analysis import analyze
from tuili.pipeline.bench import measure_speed
from tuili.pipeline.knapsack import SearchError, plan, show_cost
from tuili.pipeline.report import human_bytes
from tuili.pipeline.search_result import Measured, SearchResult
from tuili.pipeline.sensitivity import OPTIONS, LayerCost, layer_costs
from tuili.prune.structured import prune_mlp_
from tuili.quant import quantize_
from tuili.quant.config import Int8WeightOnly
from tuili.quant.kv import quantize_kv_cache_
from tuili.quant.linear import quantized_layers

MLP_SPARSITIES = (0.0, 0.125, 0.25)  # fractions of MLP neurons tried by default


def apply_plan(model: Model, choice: dict[str, str]) -> Model:
    """Quantize each layer to its chosen option (round to nearest); float ones stay."""
    quantized = {name: OPTIONS[o] for name, o in choice.items() if OPTIONS[o] is not None}
    if quantized:
        quantize_(model, Int8WeightOnly(), targets=list(quantized), ignore=(), overrides=quantized, progress=False)
    model.record("searched", plan=dict(Counter(choice.values())))
    return model


def _measure(model: Model, windows) -> Measured:
    return Measured(analyze(model).num_bytes, perplexity(model.module, windows, progress=False), measure_speed(model))


def _time_budget(
    model: Model, costs: Sequence[LayerCost], float_speed: float, baseline_speed: float, min_speedup: float
) -> float:
    """The layers' time budget (their timed seconds) for decoding `min_speedup` times faster than the
    baseline. A step takes r + k · Σ t: the layers' times as timed alone, scaled by k (caches, the
    engine's activations), plus the rest r (attention, norms, Python). Two measured points fix k and
    r: `model` float (`float_speed` tokens/s) and the fastest plan (every layer at its quickest
    format), itself measured; if that plan falls short no plan can meet the budget, and
    SearchError says so."""
    fastest = {c.name: min(c.seconds, key=c.seconds.get) for c in costs}
    speed = measure_speed(apply_plan(copy.deepcopy(model), fastest)).decode_tokens_per_second
    best = speed / baseline_speed
    if best < min_speedup:
        raise SearchError(
            f"the fastest plan (every layer at its quickest format) decodes {best:.2f}× the float "
            f"model, measured, below the {min_speedup:.2f}× asked: ask for at most that"
        )
    step_float, step_fast = 1 / float_speed, 1 / speed
    t_float = sum(c.seconds["float"] for c in costs)
    t_fast = sum(c.seconds[fastest[c.name]] for c in costs)
    k = max((step_float - step_fast) / max(t_float - t_fast, 1e-12), 1e-6)
    rest = step_float - k * t_float
    return (1 / (baseline_speed * min_speedup) - rest) / k


def search(
    model: Model,
    *,
    max_bytes: int | None = None,
    min_speedup: float | None = None,
    max_ppl_increase: float | None = None,
    mlp_sparsity: Sequence[float] = MLP_SPARSITIES,
    kv_cache: str = "float",
    data: str = "builtin",
    seq_len: int = 512,
    max_tokens: int | None = 16384,
    calib_samples: int = 8,
    calib_len: int = 256,
    attempts: int = 3,
) -> tuple[Model, SearchResult]:
    """Choose per-layer formats (and a fraction of MLP neurons to remove) for `model` (float) to
    meet the budget, apply them and measure.

    Exactly one of `max_bytes` (weights) or `min_speedup` (batch-1 decode against the float model,
    measured) sets the cost; `max_ppl_increase` (percent) is checked on the result. `mlp_sparsity`:
    the fractions of every MLP's neurons to try removing before quantizing (0: none); each gets
    its own plan, and the measured plan that meets the budget with the lowest perplexity wins.
    `kv_cache`: the KV cache format every plan gets (tuili.quant.quantize_kv_cache_), measured with it. With
    a speed budget a plan is re-made with a tighter time budget when the measurement falls short,
    up to `attempts` times. Returns the compressed model (a copy: `model` is left as it was) and
    the result."""
    levels = _check_request(model, max_bytes, min_speedup, mlp_sparsity, kv_cache)
    start = time.perf_counter()
    windows = eval_windows(model.tokenizer.encode(load_text(data, "evaluation")), seq_len, max_tokens)
    calib = calibration_samples(model.tokenizer.encode(load_text(data, "calibration")), calib_samples, calib_len)
    baseline = _measure(model, windows)
    found, candidates, last_error = [], [], None
    for fraction in levels:
        try:
            outcome = _search_at(model, fraction, kv_cache, baseline, windows, calib, max_bytes, min_speedup, attempts)
        except SearchError as e:  # this sparsity cannot meet the budget: another may
            last_error = e
            candidates.append(
                {"mlp_sparsity": fraction, "skipped": str(e), "smallest_bytes": getattr(e, "smallest_bytes", None)}
            )
            continue
        candidate = _candidate(fraction, outcome, baseline, max_bytes, min_speedup)
        candidates.append(candidate)
        found.append((not candidate["met"], candidate["perplexity"], fraction, outcome))
    if not found:
        if len(candidates) == 1 and last_error is not None:
            raise last_error
        raise SearchError(
            "no plan meets the budget: "
            + "; ".join(c["skipped"] for c in candidates)
            + " (raise the budget, or try larger --mlp-sparsity)"
        )
    # the plans that meet the budget first, then the lowest measured perplexity, then the less pruned
    _, _, fraction, outcome = min(found, key=lambda f: f[:3])
    asked = {"max_bytes": max_bytes, "min_speedup": min_speedup, "max_ppl_increase": max_ppl_increase}
    return outcome[0], _result(asked, baseline, fraction, outcome, candidates, time.perf_counter() - start)


def _check_request(model: Model, max_bytes, min_speedup, mlp_sparsity: Sequence[float], kv_cache: str) -> list[float]:
    """The MLP sparsities to try, once the budget and the model are known to make sense."""
    if (max_bytes is None) == (min_speedup is None):
        raise SearchError("give one budget to search under: --max-bytes B or --min-speedup S")
    if max_bytes is not None and max_bytes <= 0 or min_speedup is not None and min_speedup <= 1:
        raise SearchError("--max-bytes must be positive and --min-speedup above 1 (the float model is 1×)")
    levels = sorted(set(mlp_sparsity))
    if not levels or not all(0 <= f < 1 for f in levels):
        raise SearchError(f"MLP sparsities are fractions in [0, 1), at least one; got {list(mlp_sparsity)}")
    if quantized_layers(model.module):
        raise SearchError("the model is already quantized: search starts from a float model")
    try:
        check_kv_cache_format(kv_cache)
    except ValueError as e:
        raise SearchError(str(e)) from None
    return levels


def _candidate(fraction: float, outcome, baseline, max_bytes, min_speedup) -> dict:
    """One MLP sparsity's measured plan, as the result lists it."""
    _, measured, _, _, tries = outcome
    speedup = measured.speed.decode_tokens_per_second / baseline.speed.decode_tokens_per_second
    return {
        "mlp_sparsity": fraction,
        "num_bytes": measured.num_bytes,
        "attempts": tries,
        "perplexity": measured.quality.perplexity,
        "speedup": speedup,
        "met": measured.num_bytes <= max_bytes if max_bytes is not None else speedup >= min_speedup,
        "ppl_increase": 100 * (measured.quality.perplexity / baseline.quality.perplexity - 1),
    }


def _result(asked: dict, baseline, fraction: float, outcome, candidates: list[dict], seconds: float) -> SearchResult:
    """The chosen plan's result: what was asked and what was met, every candidate and attempt."""
    _, measured, choice, costs, _ = outcome
    tries = [t for c in candidates for t in c.pop("attempts", [])]
    speedup = measured.speed.decode_tokens_per_second / baseline.speed.decode_tokens_per_second
    ppl_up = 100 * (measured.quality.perplexity / baseline.quality.perplexity - 1)
    met = {
        "max_bytes": asked["max_bytes"] is not None and measured.num_bytes <= asked["max_bytes"],
        "min_speedup": asked["min_speedup"] is not None and speedup >= asked["min_speedup"],
        "max_ppl_increase": asked["max_ppl_increase"] is not None and ppl_up <= asked["max_ppl_increase"],
    }
    return SearchResult(
        asked,
        baseline,
        measured,
        choice,
        sum(c.delta[choice[c.name]] for c in costs),
        {k: met[k] for k, v in asked.items() if v is not None},
        tries,
        seconds,
        fraction,
        candidates,
    )


def _search_at(
    model: Model,
    fraction: float,
    kv_cache: str,
    baseline: Measured,
    windows,
    calib,
    max_bytes: int | None,
    min_speedup: float | None,
    attempts: int,
) -> tuple:
    """Plan, apply and measure with `fraction` of every MLP's neurons removed first and the KV cache
    in `kv_cache`: (compressed model, its measurement, the plan, the layers' costs, the attempts)."""
    work = copy.deepcopy(model)  # the caller's model stays as it was
    if fraction:
        prune_mlp_(work, fraction, "activation", calib)
    quantize_kv_cache_(work, kv_cache)
    costs = layer_costs(work, calib, time_layers=min_speedup is not None)
    key = "num_bytes" if max_bytes is not None else "seconds"
    fixed_bytes = analyze(work).num_bytes - sum(c.num_bytes["float"] for c in costs)
    baseline_speed = baseline.speed.decode_tokens_per_second
    if max_bytes is not None:
        budget = max_bytes - fixed_bytes
        smallest = fixed_bytes + sum(min(c.num_bytes.values()) for c in costs)
        if smallest > max_bytes:
            error = SearchError(
                f"with {fraction:.1%} of MLP neurons removed the smallest plan (every layer at "
                f"its cheapest format, and {human_bytes(fixed_bytes)} of embeddings and norms) "
                f"weighs {human_bytes(smallest)}, over the {human_bytes(max_bytes)} asked"
            )
            error.smallest_bytes = smallest
            raise error
    else:
        changed = fraction or kv_cache != "float"  # then the float point of the time model is this one's
        float_speed = measure_speed(work).decode_tokens_per_second if changed else baseline_speed
        budget = _time_budget(work, costs, float_speed, baseline_speed, min_speedup)
    tries = []
    for _ in range(attempts):
        choice = plan(costs, budget, key)
        compressed = apply_plan(copy.deepcopy(work), choice)
        measured = _measure(compressed, windows)
        speedup = measured.speed.decode_tokens_per_second / baseline_speed
        tries.append(
            {
                "mlp_sparsity": fraction,
                "budget": show_cost(budget + (fixed_bytes if key == "num_bytes" else 0), key),
                "measured": f"{human_bytes(measured.num_bytes)}, {speedup:.2f}×",
            }
        )
        if max_bytes is not None or speedup >= min_speedup:
            break
        budget *= speedup / min_speedup  # the measured shortfall, applied to the layers' time budget
    return compressed, measured, choice, costs, tries


__all__ = [
    "MLP_SPARSITIES",
    "SearchError",
    "SearchResult",
    "apply_plan",
    "plan",
    "search",
]
