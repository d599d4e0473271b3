"""The stages of `tuili optimize` as configs: what a recipe's stage says, checked when it is made.

A recipe (tuili.pipeline.recipe) reads each stage's settings through the config's own fields (their
names and type hints), so a setting exists once, here. The three stages that change the model
(`PruneStage`, `DistillStage`, `QuantizeStage`) `run` on it in place and return the name the report
gives the stage; the others say how `optimize` analyzes, measures, saves and exports.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tuili.data import calibration_samples, load_text
from tuili.data.batches import packed_sequences
from tuili.distill import DistillConfig, distill_
from tuili.kernels.kv_format import check_kv_cache_format
from tuili.models.loading import load
from tuili.models.model import Model
from tuili.prune import SemiStructured, Unstructured, prune_
from tuili.prune.config import parse_structured
from tuili.prune.methods import method_named as prune_method_named
from tuili.prune.structured import prune_structured_
from tuili.quant import quantize_, scheme_from_name
from tuili.quant.api import lm_head_plan
from tuili.quant.kv import quantize_kv_cache_
from tuili.quant.methods import handler_for
from tuili.quant.methods import method_named as quant_method_named

KV_LABELS = {"bfloat16": "bf16", "int8": "int8"}


class StageConfig:
    """A stage of a recipe; subclasses are frozen dataclasses."""

    kind: ClassVar[str]  # its name in a recipe
    main: ClassVar[str | None] = None  # the setting a bare value stands for (prune: mlp=0.25)
    rank: ClassVar[int] = 1  # stages run in non-decreasing rank
    once: ClassVar[bool] = True  # at most one per recipe
    hidden: ClassVar[tuple[str, ...]] = ()  # fields a recipe does not set

    @classmethod
    def settings(cls) -> dict[str, Any]:
        """The settings a recipe may give, with their types (the fields' type hints)."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in cls.hidden}  # type: ignore[arg-type]

    @classmethod
    def required(cls) -> tuple[str, ...]:
        missing = dataclasses.MISSING
        return tuple(
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is missing and f.default_factory is missing and f.name not in cls.hidden
        )

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> StageConfig:
        return cls(**settings)


class Transform(StageConfig, ABC):
    """A stage that changes the model."""

    @abstractmethod
    def run(self, model: Model, data: str) -> str:
        """Apply the stage to `model` in place (calibrating on `data`); the stage's name."""


def _calibration(model: Model, data: str, samples: int, length: int):
    return calibration_samples(model.tokenizer.encode(load_text(data, "calibration")), samples, length)


@dataclass(frozen=True)
class QuantizeStage(Transform):
    """Quantize in place: `lm_head` keeps the head float, makes it int8 weight-only or gives it the
    scheme too ("same"); `kv_cache` is what the engine's KV cache stores ("float": the model's dtype);
    `symmetric`: 4-bit weights without zero points (the files transformers and vLLM load; false:
    asymmetric, which tuili and compressed-tensors read back but transformers does not)."""

    scheme: str
    method: str = "rtn"
    group_size: int | None = None
    symmetric: bool = True
    lm_head: str = "float"
    kv_cache: str = "float"
    calib_samples: int = 64
    calib_len: int = 512

    kind = "quantize"
    main = "scheme"
    rank = 2

    def __post_init__(self):  # every value checked now: a recipe is refused before anything runs
        lm_head_plan(self.lm_head)
        check_kv_cache_format(self.kv_cache)
        handler_for(quant_method_named(self.method)).check(self.config())

    def config(self):
        return scheme_from_name(self.scheme, self.group_size, self.symmetric)

    def run(self, model: Model, data: str) -> str:
        config, method = self.config(), quant_method_named(self.method)
        ignore, overrides = lm_head_plan(self.lm_head)
        calib = None
        if handler_for(method).needs_data([config]):
            calib = _calibration(model, data, self.calib_samples, self.calib_len)
        quantize_(model, config, method, calib=calib, ignore=ignore, overrides=overrides)
        quantize_kv_cache_(model, self.kv_cache)
        detail = f" g{config.group_size}" if getattr(config, "group_size", None) else ""
        detail += "" if getattr(config, "symmetric", True) else " asymmetric"
        head = "" if self.lm_head == "float" else f", {'int8' if self.lm_head == 'int8' else self.scheme} head"
        kv = "" if self.kv_cache == "float" else f", {KV_LABELS[self.kv_cache]} KV cache"
        return f"quantize {self.scheme}{detail} {self.method}{head}{kv}"


@dataclass(frozen=True)
class PruneStage(Transform):
    """Prune in place: `spec` is a sparsity ("0.5"), an N:M pattern ("2:4") or structured parts
    ("mlp=0.25,heads=0.34,layers=4")."""

    spec: str
    method: str = "wanda"
    calib_samples: int = 64
    calib_len: int = 512

    kind = "prune"
    main = "spec"
    once = False

    def __post_init__(self):
        prune_method_named(self.method)
        self.target()

    def target(self):
        if "=" in self.spec:
            return parse_structured(self.spec)
        return SemiStructured.parse(self.spec) if ":" in self.spec else Unstructured(_sparsity(self.spec))

    def run(self, model: Model, data: str) -> str:
        calib = _calibration(model, data, self.calib_samples, self.calib_len)
        target = self.target()
        if isinstance(target, dict):
            prune_structured_(model, target, "activation", calib)
            return f"prune {self.spec}"
        prune_(model, target, prune_method_named(self.method), calib=calib, progress=False)
        return f"prune {self.spec} {self.method}"


def _sparsity(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"a pruning spec is a sparsity (0.5), a pattern (2:4) or mlp=F,heads=F,layers=N; got {text!r}"
        ) from None


_DISTILL_HIDDEN = ("steps", "eval_every", "checkpoint_every", "keep_checkpoints")  # set by the stage


@dataclass(frozen=True)
class DistillStage(Transform):
    """Train in place from a teacher (default: the model as loaded from its source, i.e. before this
    run's pruning) for `steps` steps on `seq_len`-token windows; every other setting is
    `DistillConfig`'s (warm-up: a twentieth of the steps unless given)."""

    steps: int
    teacher: str | None = None
    seq_len: int = 256
    config: DistillConfig = field(default_factory=DistillConfig)

    kind = "distill"
    main = "steps"
    once = False
    hidden = ("config",)

    def __post_init__(self):
        if self.config.steps != self.steps:  # the config's steps are the stage's; no checkpoints mid-pipeline
            object.__setattr__(
                self, "config", dataclasses.replace(self.config, steps=self.steps, checkpoint_every=0, eval_every=0)
            )

    @classmethod
    def settings(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(DistillConfig)
        own = super().settings()
        return own | {f.name: hints[f.name] for f in dataclasses.fields(DistillConfig) if f.name not in _DISTILL_HIDDEN}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> DistillStage:
        own = {k: v for k, v in settings.items() if k in ("steps", "teacher", "seq_len")}
        trainer = {k: v for k, v in settings.items() if k not in own}
        trainer.setdefault("warmup_steps", max(1, own["steps"] // 20))
        config = DistillConfig(steps=own["steps"], checkpoint_every=0, eval_every=0, **trainer)
        return cls(config=config, **own)

    def run(self, model: Model, data: str) -> str:
        spec = self.teacher or model.source
        teacher = load(spec, dtype=str(model.module.dtype).removeprefix("torch."))
        train = packed_sequences(model.tokenizer.encode(load_text(data, "calibration")), self.seq_len)
        distill_(model, self.config, teacher=teacher, train=train, progress=False)
        return f"distill {self.steps} steps from {spec} (T={self.config.temperature:g}, α={self.config.alpha:g})"


@dataclass(frozen=True)
class AnalyzeStage(StageConfig):
    """The analysis before any stage: `context_len` for the KV-cache figures, `sensitivity` for the
    per-layer sensitivity plot."""

    context_len: int = 2048
    sensitivity: bool = True

    kind = "analyze"
    rank = 0


@dataclass(frozen=True)
class BenchmarkStage(StageConfig):
    """How every stage is measured: perplexity on up to `max_tokens` tokens in `seq_len` windows;
    output tokens/s at each of `batch_sizes` concurrent requests besides batch-1 decode."""

    max_tokens: int = 16384
    seq_len: int = 512
    batch_sizes: tuple[int, ...] = ()

    kind = "benchmark"
    rank = 4

    def __post_init__(self):
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))


@dataclass(frozen=True)
class SaveStage(StageConfig):
    """Save the model (safetensors, compressed-tensors where quantized) to the folder `path`."""

    path: str

    kind = "save"
    main = "path"
    rank = 5


@dataclass(frozen=True)
class ExportStage(StageConfig):
    """Export to `path`: ONNX (.onnx, checked in onnxruntime) or GGUF (.gguf, read back)."""

    path: str

    kind = "export"
    main = "path"
    rank = 5
    once = False

    def __post_init__(self):
        if not self.path.endswith((".onnx", ".gguf")):
            raise ValueError(f"export writes ONNX or GGUF: its path must end in .onnx or .gguf, got {self.path!r}")


KINDS: dict[str, type[StageConfig]] = {
    c.kind: c for c in (AnalyzeStage, PruneStage, DistillStage, QuantizeStage, BenchmarkStage, SaveStage, ExportStage)
}
