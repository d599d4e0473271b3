"""Reports are data first; these helpers print them as markdown tables for terminals and docs."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table, numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _is_number(text: str) -> bool:
    head = text.split(" ")[0].replace(",", "").rstrip("%×x")
    try:
        float(head)
    except ValueError:
        return False
    return True


def sparsity_markdown(report) -> str:
    """A `tuili.prune.SparsityReport` as a table: weights, zeros and sparsity per layer and in all."""
    rows = [[layer.name, f"{layer.params:,}", f"{layer.zeros:,}", f"{layer.sparsity:.2%}"] for layer in report.layers]
    rows.append(["**all linear layers**", f"{report.params:,}", f"{report.zeros:,}", f"{report.sparsity:.2%}"])
    return markdown_table(["layer", "weights", "zeros", "sparsity"], rows)
