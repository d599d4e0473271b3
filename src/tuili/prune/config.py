"""What to prune to: a fraction of weights (unstructured), or N of every M (semi-structured)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Unstructured:
    """Remove `sparsity` of the weights: of each layer (scope="layer") or of all targeted layers
    together (scope="global": layers with smaller scores lose more)."""

    sparsity: float
    scope: Literal["layer", "global"] = "layer"

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights removed), got {self.sparsity}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")


@dataclass(frozen=True)
class SemiStructured:
    """N:M sparsity: in every group of M consecutive weights along a row's inputs, N are kept
    (2:4 keeps 2 of 4: the pattern sparse tensor cores and sparse kernels run)."""

    n: int = 2
    m: int = 4

    def __post_init__(self):
        if not (0 < self.n < self.m):
            raise ValueError(f"N:M needs 0 < N < M (N weights kept of every M), got {self.n}:{self.m}")

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    @classmethod
    def parse(cls, text: str) -> SemiStructured:
        """'2:4' → SemiStructured(2, 4)."""
        try:
            n, m = (int(part) for part in text.split(":"))
        except ValueError:
            raise ValueError(f"a pattern is N:M with integers, like 2:4; got {text!r}") from None
        return cls(n, m)


Target = Unstructured | SemiStructured


def parse_structured(text: str) -> dict[str, float]:
    """'mlp=0.25,heads=0.34,layers=4' → {"mlp": 0.25, "heads": 0.34, "layers": 4}: fractions of MLP
    neurons, of a mixture's experts and of attention heads, and a number of whole layers, to remove."""
    parts: dict[str, float] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in ("mlp", "experts", "heads", "layers") or not value:
            raise ValueError(f"structured pruning takes mlp=F,experts=F,heads=F,layers=N; got {item!r}")
        try:
            parts[key] = int(value) if key == "layers" else float(value)
        except ValueError:
            raise ValueError(f"structured pruning: {key} needs a number, got {value!r}") from None
    return parts
