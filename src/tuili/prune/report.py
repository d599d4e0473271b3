"""The sparsity report: zeros per layer and in all, as data (`to_dict` for JSON;
`tuili.pipeline.report.sparsity_markdown` prints it as a table)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class LayerSparsity:
    name: str
    params: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


@dataclass
class SparsityReport:
    layers: list[LayerSparsity]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
            "layers": [
                {"name": layer.name, "params": layer.params, "zeros": layer.zeros, "sparsity": layer.sparsity}
                for layer in self.layers
            ],
        }


def sparsity_report(module: nn.Module) -> SparsityReport:
    """Zeros in the weight of every linear layer (tied weights counted once)."""
    seen, layers = set(), []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            w = m.weight.detach()
            layers.append(LayerSparsity(name, w.numel(), int((w == 0).sum())))
    return SparsityReport(layers)
