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
from dataclasses import dataclass, field

from tuili.data import calibration_samples, eval_windows, load_text, perplexity
from tuili.data.perplexity import Perplexity
from tuili.kernels.kv_format import check_kv_cache_format
from tuili.models.model import Model
from tuili.pipeline.analysis import analyze
from tuili.pipeline.bench import Speed, measure_speed
from tuili.pipeline.knapsack import SearchError, plan, show_cost
from tuili.pipeline.report import human_bytes, markdown_table
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


@dataclass
class Measured:
    num_bytes: int
    quality: Perplexity
    speed: Speed

    def to_dict(self) -> dict:
        return {"num_bytes": self.num_bytes, "quality": self.quality.to_dict(), "speed": self.speed.to_dict()}


@dataclass
class SearchResult:
    budget: dict  # max_bytes / min_speedup / max_ppl_increase as asked
    baseline: Measured
    result: Measured
    choice: dict[str, str]
    predicted_delta: float  # Σ predicted ΔL of the plan (Fisher), nats/token
    met: dict[str, bool]  # per budget, from the measurement
    attempts: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    mlp_sparsity: float = 0.0  # the fraction of MLP neurons the chosen plan removed
    candidates: list[dict] = field(default_factory=list)  # one per sparsity tried, measured

    @property
    def ppl_increase(self) -> float:
        return 100 * (self.result.quality.perplexity / self.baseline.quality.perplexity - 1)

    @property
    def speedup(self) -> float:
        return self.result.speed.decode_tokens_per_second / self.baseline.speed.decode_tokens_per_second

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "baseline": self.baseline.to_dict(),
            "result": self.result.to_dict(),
            "choice": self.choice,
            "predicted_delta": self.predicted_delta,
            "met": self.met,
            "attempts": self.attempts,
            "seconds": self.seconds,
            "mlp_sparsity": self.mlp_sparsity,
            "candidates": self.candidates,
        }

    def to_markdown(self) -> str:
        b, r = self.baseline, self.result
        rows = [
            [
                name,
                human_bytes(m.num_bytes),
                f"{m.quality.perplexity:.3f}",
                f"{100 * (m.quality.perplexity / b.quality.perplexity - 1):+.2f}%",
                f"{m.speed.decode_tokens_per_second:.1f}",
                f"{m.speed.decode_tokens_per_second / b.speed.decode_tokens_per_second:.2f}×",
            ]
            for name, m in (("baseline", b), ("searched plan", r))
        ]
        table = markdown_table(["model", "weights", "perplexity", "Δ perplexity", "decode tok/s", "speed-up"], rows)
        kinds: dict[str, Counter] = {}
        for name, option in self.choice.items():
            kinds.setdefault(name.rsplit(".", 1)[-1], Counter())[option] += 1
        options = list(OPTIONS)
        plan_table = markdown_table(
            ["layer kind", *options], [[k, *(str(c[o]) for o in options)] for k, c in kinds.items()]
        )
        asked = {
            "max_bytes": lambda v: f"weights ≤ {human_bytes(v)} (measured {human_bytes(r.num_bytes)})",
            "min_speedup": lambda v: f"decode ≥ {v:.2f}× the baseline (measured {self.speedup:.2f}×)",
            "max_ppl_increase": lambda v: f"perplexity ≤ +{v:.2f}% (measured {self.ppl_increase:+.2f}%)",
        }
        budgets = "\n".join(
            f"- {asked[k](v)}: **{'met' if self.met[k] else 'NOT met'}**"
            for k, v in self.budget.items()
            if v is not None
        )
        tries = "".join(
            f"\n- attempt {i + 1}: {a['mlp_sparsity']:.1%} of MLP neurons removed, budget {a['budget']}, "
            f"measured {a['measured']}"
            for i, a in enumerate(self.attempts)
        )
        pruned = (
            f"MLP neurons removed first: {self.mlp_sparsity:.1%} of every layer's (structured).\n\n"
            if self.mlp_sparsity
            else ""
        )
        tried = ""
        if len(self.candidates) > 1:
            tried = (
                "Sparsities tried (each with its own plan, measured):\n\n"
                + markdown_table(CANDIDATE_HEADERS, [candidate_row(c) for c in self.candidates])
                + "\n\n"
            )
        return (
            f"# tuili search\n\n{budgets}\n\n{table}\n\n{pruned}Layers per format:\n\n{plan_table}\n\n"
            f"{tried}Predicted loss increase of the plan's formats (Fisher): {self.predicted_delta:.2e} "
            f"nats/token. Search took {self.seconds:.0f} s.\n\nAttempts:{tries}\n"
        )


CANDIDATE_HEADERS = ["MLP neurons removed", "weights", "perplexity", "Δ perplexity", "speed-up", "budget met"]


def candidate_row(candidate: dict) -> list[str]:
    """One sparsity the search tried (`SearchResult.candidates`), as a row under CANDIDATE_HEADERS."""
    c = candidate
    if "perplexity" not in c:  # no plan at this sparsity
        why = (
            f"its smallest plan weighs {human_bytes(c['smallest_bytes'])}"
            if c.get("smallest_bytes") is not None
            else c["skipped"]
        )
        return [f"{c['mlp_sparsity']:.1%}", "", "", "", "", f"no: {why}"]
    return [
        f"{c['mlp_sparsity']:.1%}",
        human_bytes(c["num_bytes"]),
        f"{c['perplexity']:.3f}",
        f"{c['ppl_increase']:+.2f}%",
        f"{c['speedup']:.2f}×",
        "yes" if c["met"] else "no",
    ]


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
        compressed, measured, choice, costs, tries = outcome
        speedup = measured.speed.decode_tokens_per_second / baseline.speed.decode_tokens_per_second
        met = measured.num_bytes <= max_bytes if max_bytes is not None else speedup >= min_speedup
        candidates.append(
            {
                "mlp_sparsity": fraction,
                "num_bytes": measured.num_bytes,
                "attempts": tries,
                "perplexity": measured.quality.perplexity,
                "speedup": speedup,
                "met": met,
                "ppl_increase": 100 * (measured.quality.perplexity / baseline.quality.perplexity - 1),
            }
        )
        found.append((not met, measured.quality.perplexity, fraction, outcome))
    if not found:
        if len(candidates) == 1:
            raise last_error
        raise SearchError(
            "no plan meets the budget: "
            + "; ".join(c["skipped"] for c in candidates)
            + " (raise the budget, or try larger --mlp-sparsity)"
        )
    # the plans that meet the budget first, then the lowest measured perplexity, then the less pruned
    _, _, fraction, (compressed, measured, choice, costs, _) = min(found, key=lambda f: f[:3])
    tries = [t for c in candidates for t in c.pop("attempts", [])]
    speedup = measured.speed.decode_tokens_per_second / baseline.speed.decode_tokens_per_second
    ppl_up = 100 * (measured.quality.perplexity / baseline.quality.perplexity - 1)
    met = {
        "max_bytes": max_bytes is not None and measured.num_bytes <= max_bytes,
        "min_speedup": min_speedup is not None and speedup >= min_speedup,
        "max_ppl_increase": max_ppl_increase is not None and ppl_up <= max_ppl_increase,
    }
    asked = {"max_bytes": max_bytes, "min_speedup": min_speedup, "max_ppl_increase": max_ppl_increase}
    result = SearchResult(
        asked,
        baseline,
        measured,
        choice,
        sum(c.delta[choice[c.name]] for c in costs),
        {k: met[k] for k, v in asked.items() if v is not None},
        tries,
        time.perf_counter() - start,
        fraction,
        candidates,
    )
    return compressed, result


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
    "CANDIDATE_HEADERS",
    "MLP_SPARSITIES",
    "SearchError",
    "SearchResult",
    "apply_plan",
    "candidate_row",
    "plan",
    "search",
]
