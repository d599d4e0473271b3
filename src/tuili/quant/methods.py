"""Quantization methods: config dataclasses registered to the handlers that run them.

`quantize_(model, scheme, GPTQ(damp=0.01))` looks up the handler registered for the config's type
and runs it one decoder layer at a time (tuili.quant.api). A handler says which schemes it takes,
whether it smooths a layer before rounding it (AWQ, SmoothQuant), what it gathers from the layer's
calibration inputs (`LayerStats`) and how it rounds one linear layer. Adding a method is one
module: a frozen dataclass with a `name` for its options, a `MethodHandler` subclass decorated with
`@register(ThatConfig)`, and the module's import in tuili.quant.api so that it registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tuili.models.layerwise import Hessian, LayerRunner, input_hooks
from tuili.quant.config import QuantScheme
from tuili.quant.observers import MinMax, make_observer
from tuili.registry import Registry

MAX_SAMPLE_ROWS = 512  # calibration tokens a search (AWQ) looks at per layer


@dataclass
class LayerStats:
    """What one linear layer's rounding gets from its calibration inputs."""

    observer: MinMax | None = None  # the static activation scale's (Int8StaticActivation)
    hessian: Hessian | None = None  # the inputs' second moments (GPTQ)
    samples: Tensor | None = None  # the first MAX_SAMPLE_ROWS input rows (AWQ's clip search)
    rows: int | None = None  # input rows seen, where watched (0: a MoE expert no calibration token reached)

    def take_hessian(self) -> Tensor:
        """H as a matrix of its own, the running sum dropped (0.8 GB at 14336 inputs)."""
        assert self.hessian is not None, "the method gathered no Hessian"
        h, self.hessian = self.hessian.value(), None
        return h

    def input_scale(self) -> Tensor | None:
        return None if self.observer is None else self.observer.scale()


class MethodHandler:
    """How one method quantizes; the defaults are round to nearest, with static activation scales
    observed where the scheme asks for them."""

    schemes: ClassVar[str] = "any"  # "weight-only", "w8a8" or "any": the schemes it takes
    calibrated: ClassVar[bool] = False  # needs calibration data whatever the scheme

    def __init__(self, config) -> None:
        self.config = config
        self.hessians = False  # gather each layer's Hessian
        self.samples = False  # gather each layer's first input rows

    @property
    def name(self) -> str:
        return self.config.name

    def check(self, scheme: QuantScheme) -> None:
        """Refuse a scheme the method does not apply to."""
        if self.schemes == "weight-only" and not scheme.weight_only:
            raise ValueError(
                f"{self.name} quantizes weights only: use it with w4a16 or w8a16, and SmoothQuant for w8a8"
            )
        if self.schemes == "w8a8" and scheme.weight_only:
            raise ValueError(f"{self.name} prepares activations for int8: use it with w8a8-dynamic or w8a8-static")

    def needs_data(self, schemes: list[QuantScheme]) -> bool:
        """Whether quantizing layers of these schemes takes calibration data (a layer-by-layer pass)."""
        return self.calibrated or any(s.static for s in schemes)

    def smooth(self, runner: LayerRunner, layer: nn.Module, local: dict[str, nn.Linear], schemes: dict) -> None:
        """Rescale the layer's channels before its linears are rounded (AWQ, SmoothQuant)."""

    def gather(
        self, runner: LayerRunner, layer: nn.Module, local: dict[str, nn.Linear], schemes: dict[str, QuantScheme]
    ) -> dict[str, LayerStats]:
        """One pass of the calibration samples through `layer`, watching the inputs of `local`."""
        stats = {name: LayerStats() for name in local}
        for name, scheme in schemes.items():
            if scheme.static:
                stats[name].observer = make_observer(scheme.observer)  # type: ignore[attr-defined]
            if self.hessians:
                stats[name].hessian = Hessian(local[name].in_features)
        watched = {n: local[n] for n, s in stats.items() if s.observer or s.hessian} if not self.samples else local
        if not watched:
            return stats
        rows: dict[str, list[Tensor]] = {n: [] for n in local}
        for name in watched:
            stats[name].rows = 0

        def observe(name: str, x: Tensor) -> None:
            s = stats[name]
            s.rows = (s.rows or 0) + x.numel() // x.shape[-1]
            if s.observer is not None:
                s.observer.observe(x)
            if s.hessian is not None:
                s.hessian.add(x)
            if self.samples:
                have = sum(r.shape[0] for r in rows[name])
                if have < MAX_SAMPLE_ROWS:
                    rows[name].append(x[: MAX_SAMPLE_ROWS - have].detach().float().clone())

        with input_hooks(watched, observe):
            runner.run(layer)
        if self.samples:
            for name, kept in rows.items():
                stats[name].samples = torch.cat(kept)
        return stats

    def quantize(self, linear: nn.Linear, scheme: QuantScheme, stats: LayerStats) -> nn.Module:
        """The quantized replacement of one linear layer."""
        return scheme.from_float(linear, stats.input_scale())


REGISTRY: Registry[MethodHandler] = Registry("quantization method")
METHODS = REGISTRY.configs  # name -> config class (the CLI's and recipes' choices)
register = REGISTRY.register
handler_for = REGISTRY.handler_for
method_named = REGISTRY.named  # the config of the method called `name`, with its defaults


@dataclass(frozen=True)
class RTN:
    """Round to nearest, min-max range per channel or group: no calibration data needed."""

    name = "rtn"


@register(RTN)
class RTNHandler(MethodHandler):
    """Round to nearest: the defaults."""
