"""What `tuili search` found: the measured baseline and plan, what was asked and met, every
candidate sparsity and attempt, as data (`to_dict`) and as markdown."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tuili.data.perplexity import Perplexity
from tuili.pipeline.bench import Speed
from tuili.pipeline.report import human_bytes, markdown_table
from tuili.pipeline.sensitivity import OPTIONS


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
