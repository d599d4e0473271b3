"""Pruning methods: config dataclasses registered to the handlers that run them.

`prune_(model, Unstructured(0.5), Wanda())` looks up the handler registered for the config's type.
A handler scores the whole model at once (magnitude, Taylor) or one decoder layer at a time from
the inputs it receives (Wanda, SparseGPT: tuili.models.layerwise), and says which targets it takes.
Adding a method: a frozen dataclass with a `name` for its options, a `ScoringHandler` or
`LayerwiseHandler` subclass
decorated with `@register(ThatConfig)` (here, or in a module imported by tuili.prune.api).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tuili.models.layerwise import Hessian
from tuili.prune.config import SemiStructured, Target, Unstructured
from tuili.prune.importance import InputNorms, magnitude, taylor, wanda
from tuili.prune.masks import global_masks, nm_mask, unstructured_mask
from tuili.prune.sparsegpt import sparsegpt
from tuili.registry import Registry


def target_masks(scores: dict[str, Tensor], target: Target, per_row: bool) -> dict[str, Tensor]:
    """Each layer's mask (True = kept) from its scores, for an N:M, per-layer or global target."""
    if isinstance(target, SemiStructured):
        return {n: nm_mask(s, target.n, target.m) for n, s in scores.items()}
    if target.scope == "global":
        return global_masks(scores, target.sparsity)
    return {n: unstructured_mask(s, target.sparsity, per_row) for n, s in scores.items()}


def global_target(target: Target) -> bool:
    return isinstance(target, Unstructured) and target.scope == "global"


class PruneHandler:
    """How one method prunes: a `ScoringHandler` (the whole model at once) or a `LayerwiseHandler`
    (one decoder layer at a time)."""

    calibrated: ClassVar[bool] = False  # needs calibration token ids

    def __init__(self, config) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def check(self, target: Target) -> None:
        """Refuse a target the method cannot prune to."""


class ScoringHandler(PruneHandler, ABC):
    @abstractmethod
    def scores(
        self, module: nn.Module, linears: dict[str, nn.Linear], calib: Tensor | None, progress: bool
    ) -> dict[str, Tensor]:
        """Every targeted layer's weight scores (larger: kept), for the whole model at once."""


class LayerwiseHandler(PruneHandler, ABC):
    calibrated = True

    @abstractmethod
    def statistic(self, in_features: int) -> InputNorms | Hessian:
        """What the method accumulates over a layer's calibration inputs."""

    @abstractmethod
    def prune_layer(
        self, local: dict[str, nn.Linear], stats: dict, target: Target
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One decoder layer: (masks to attach now, scores left for one global threshold)."""


REGISTRY: Registry[PruneHandler] = Registry("pruning method")
METHODS = REGISTRY.configs  # name -> config class (the CLI's and recipes' choices)
register = REGISTRY.register
handler_for = REGISTRY.handler_for
method_named = REGISTRY.named  # the config of the method called `name`, with its defaults


@dataclass(frozen=True)
class Magnitude:
    """|W|: no data needed."""

    name = "magnitude"


@dataclass(frozen=True)
class Taylor:
    """|W ⊙ ∂L/∂W| summed over calibration batches (first-order Taylor)."""

    name = "taylor"


@dataclass(frozen=True)
class Wanda:
    """|W| · ‖X_j‖ (Sun et al., arXiv:2306.11695), per output row, one decoder layer at a time."""

    name = "wanda"


@dataclass(frozen=True)
class SparseGPT:
    """OBS pruning with the remaining weights updated (Frantar & Alistarh, arXiv:2301.00774)."""

    damp: float = 0.01
    block_size: int = 128
    name = "sparsegpt"

    def __post_init__(self):
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")


@register(Magnitude)
class MagnitudeHandler(ScoringHandler):
    def scores(self, module, linears, calib, progress):
        return {n: magnitude(m.weight) for n, m in linears.items()}


@register(Taylor)
class TaylorHandler(ScoringHandler):
    calibrated = True

    def scores(self, module, linears, calib, progress):
        return taylor(module, linears, calib, progress=progress)


@register(Wanda)
class WandaHandler(LayerwiseHandler):
    def statistic(self, in_features: int) -> InputNorms:
        return InputNorms(in_features)

    def prune_layer(self, local, stats, target):
        scores = {n: wanda(m.weight, stats[n].value()) for n, m in local.items()}
        if global_target(target):  # one threshold over every layer: after the last one
            return {}, scores
        return target_masks(scores, target, per_row=True), {}  # now: the next layer sees pruned outputs


@register(SparseGPT)
class SparseGPTHandler(LayerwiseHandler):
    def check(self, target: Target) -> None:
        if global_target(target):
            raise ValueError(
                "sparsegpt prunes layer by layer with its own update: use scope='layer' (or wanda/magnitude "
                "for a global threshold)"
            )

    def statistic(self, in_features: int) -> Hessian:
        return Hessian(in_features)

    def prune_layer(self, local, stats, target):
        masks = {}
        for name, m in local.items():
            weight, mask = sparsegpt(m.weight, stats[name].value(), target, self.config.damp, self.config.block_size)
            with torch.no_grad():
                m.weight.copy_(weight.to(m.weight.dtype))
            masks[name] = mask
        return masks, {}
