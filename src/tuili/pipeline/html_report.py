"""The report `tuili optimize` writes: one self-contained HTML file (tables, and plots embedded as
PNG data) and a markdown summary beside it.

Plots, made with matplotlib: perplexity against weight bytes and against batch-1 decode speed,
each stage a point and the Pareto front (no other point both smaller-or-faster and better) drawn
through the points on it; and, when measured, the per-layer sensitivity (predicted loss increase
of int8 and int4 for every linear layer, tuili.pipeline.sensitivity).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from tuili.models.io import atomic_write_text
from tuili.pipeline.analysis import analysis_tables
from tuili.pipeline.sensitivity import LayerCost


def pareto_front(points: Sequence[tuple[float, float]], larger_is_better: bool = False) -> list[int]:
    """Indices of the points (x, perplexity) that no other point beats on both: lower perplexity and
    lower x (bytes) or, with `larger_is_better`, higher x (speed). Sorted by x."""
    sign = -1 if larger_is_better else 1
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any(sign * xo <= sign * x and yo <= y and (xo, yo) != (x, y) for xo, yo in points)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, nothing opened
    import matplotlib.pyplot as plt

    return plt


def tradeoff_plot(
    names: Sequence[str], xs: Sequence[float], ppl: Sequence[float], xlabel: str, larger_is_better: bool
) -> str:
    """Perplexity against `xs`, a point per stage, the Pareto front joined; PNG as base64."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    front = pareto_front(list(zip(xs, ppl)), larger_is_better)
    ax.scatter(xs, ppl, s=36, color="#4c72b0", zorder=3, label="stage")
    ax.plot(
        [xs[i] for i in front],
        [ppl[i] for i in front],
        color="#dd8452",
        lw=1.5,
        zorder=2,
        label="Pareto front",
        marker="o",
        mfc="none",
        ms=11,
    )
    for name, x, y in zip(names, xs, ppl):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (lower is better)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    data = _figure_png(fig)
    plt.close(fig)
    return data


def sensitivity_plot(costs: Sequence[LayerCost]) -> str:
    """Predicted loss increase per linear layer for int8 and int4 (log scale); PNG as base64."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.6, 4.0))
    positions = range(len(costs))
    for option, color in (("int4-g128", "#c44e52"), ("int4-g32", "#dd8452"), ("int8", "#4c72b0")):
        values = [c.delta.get(option) for c in costs]
        ax.scatter(
            [i for i, v in zip(positions, values) if v], [v for v in values if v], s=9, color=color, label=option
        )
    ax.set_yscale("log")
    ax.set_xlabel("linear layer (model order; the head last)")
    ax.set_ylabel("predicted loss increase (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    data = _figure_png(fig)
    plt.close(fig)
    return data


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(data: str, alt: str) -> str:
    return (
        f'<figure><img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #f3f3f3; }
figure { display: inline-block; margin: 0 1rem 1rem 0; }
img.plot { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.8rem; color: #555; }
"""


def render_html(report) -> str:
    """The whole report (an OptimizeReport) as one HTML document (no external files, scripts or fonts)."""
    costs = report.sensitivity
    headers, rows = report.stage_table()
    names = [s.name for s in report.stages]
    ppl = [s.quality.perplexity for s in report.stages]
    plots = [
        _img(
            tradeoff_plot(names, [s.num_bytes / 2**20 for s in report.stages], ppl, "weights (MiB)", False),
            "Quality against size: perplexity and weight bytes of every stage, the Pareto front joined",
        ),
        _img(
            tradeoff_plot(
                names,
                [s.speed.decode_tokens_per_second for s in report.stages],
                ppl,
                "batch-1 decode (tokens/s, higher is faster)",
                True,
            ),
            "Quality against speed: perplexity and decode tokens/s of every stage, the Pareto front joined",
        ),
    ]
    sensitivity = ""
    if costs:
        plots.append(
            _img(
                sensitivity_plot(costs),
                "Per-layer sensitivity: predicted loss increase (diagonal "
                "Fisher) of quantizing each linear layer alone",
            )
        )
        worst = sorted(costs, key=lambda c: -c.delta.get("int8", 0.0))[:10]
        sensitivity = "<h3>Most sensitive layers (int8)</h3>" + _table(
            ["layer", "shape", *(o for o in ("int8", "int4-g32", "int4-g128"))],
            [
                [
                    c.name,
                    "×".join(map(str, c.shape)),
                    *(f"{c.delta[o]:.2e}" if o in c.delta else "—" for o in ("int8", "int4-g32", "int4-g128")),
                ]
                for c in worst
            ],
        )
    analysis = "".join(_table(h, r) for h, r in analysis_tables(report.analysis))
    recipe = f"<p>Recipe: <b>{html.escape(report.recipe)}</b></p>" if report.recipe else ""
    notes = "".join(f"<p>{html.escape(line)}</p>" for line in report.notes())
    title = f"tuili optimize: {report.model}"
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{recipe}"
        f"<h2>Stages</h2><p>{html.escape(report.measured_on())}</p>{_table(headers, rows)}{notes}"
        f"<h2>Trade-offs</h2>{''.join(plots)}{sensitivity}<h2>Analysis</h2>{analysis}</body></html>"
    )


def write_report(report, directory: str | Path) -> tuple[Path, Path]:
    """report.html and report.md in `directory` (created), each written atomically; their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    page, summary = directory / "report.html", directory / "report.md"
    atomic_write_text(page, render_html(report))
    atomic_write_text(summary, report.to_markdown())
    return page, summary


__all__ = ["pareto_front", "render_html", "write_report"]
