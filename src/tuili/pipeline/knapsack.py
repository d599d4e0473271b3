"""The per-layer format choice as a multiple-choice knapsack: one option per layer, Σ ΔL as small as
possible subject to Σ cost ≤ budget. `plan` solves it greedily on each layer's lower convex hull
(cost against ΔL), taking upgrades in order of loss saved per unit of cost, which is optimal up to
the last upgrade that no longer fits."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from tuili.errors import TuiliError
from tuili.pipeline.report import human_bytes
from tuili.pipeline.sensitivity import LayerCost


class SearchError(TuiliError, ValueError):
    """A budget no plan can meet, or settings that do not make a search."""


def _hull(cost: LayerCost, key: str) -> list[str]:
    """The layer's options on the lower convex hull of (cost, ΔL), cheapest first: an option that
    costs more and loses more than another, or lies above the segment between two, is never worth it."""
    by_cost = sorted(cost.delta, key=lambda o: (getattr(cost, key)[o], cost.delta[o]))
    hull: list[str] = []
    for o in by_cost:
        c, d = getattr(cost, key)[o], cost.delta[o]
        if hull and d >= cost.delta[hull[-1]]:
            continue  # no cheaper in loss than a cheaper option
        while len(hull) >= 2:
            (c1, d1), (c2, d2) = ((getattr(cost, key)[h], cost.delta[h]) for h in hull[-2:])
            if (d1 - d2) * (c - c2) <= (d2 - d) * (c2 - c1):  # hull[-1] is not below the chord
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def plan(costs: Sequence[LayerCost], budget: float, key: str = "num_bytes") -> dict[str, str]:
    """Layer name -> option with Σ cost[key] ≤ budget and Σ ΔL as small as the greedy finds.
    Raises SearchError if even the cheapest plan does not fit."""
    hulls = {c.name: _hull(c, key) for c in costs}
    by_name = {c.name: c for c in costs}
    choice = {name: 0 for name in hulls}  # index into the hull
    total = sum(getattr(by_name[n], key)[h[0]] for n, h in hulls.items())
    if total > budget:
        raise SearchError(
            f"the budget ({show_cost(budget, key)}) is below the cheapest plan, every layer at its "
            f"cheapest format ({show_cost(total, key)}): raise it"
        )
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        i, hull = choice[name], hulls[name]
        if i + 1 < len(hull):
            c = by_name[name]
            extra = getattr(c, key)[hull[i + 1]] - getattr(c, key)[hull[i]]
            saved = c.delta[hull[i]] - c.delta[hull[i + 1]]
            heapq.heappush(heap, (-saved / max(extra, 1e-30), name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        c, hull, i = by_name[name], hulls[name], choice[name]
        extra = getattr(c, key)[hull[i + 1]] - getattr(c, key)[hull[i]]
        if total + extra <= budget:
            total += extra
            choice[name] = i + 1
            push(name)
    return {name: hulls[name][i] for name, i in choice.items()}


def show_cost(value: float, key: str) -> str:
    """A budget or cost as people read it: bytes, or milliseconds per token."""
    return human_bytes(value) if key == "num_bytes" else f"{1000 * value:.2f} ms/token"
