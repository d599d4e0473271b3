"""`tuili optimize`: the main job. It analyzes the model, measures the baseline (perplexity, speed),
applies each requested compression stage and measures again, so every figure sits beside the
uncompressed baseline from the same run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tuili.data import calibration_samples, eval_windows, load_text, perplexity
from tuili.data.perplexity import Perplexity
from tuili.models.model import Model
from tuili.pipeline.analysis import Analysis, analysis_markdown, analyze
from tuili.pipeline.bench import Speed, measure_speed, speed_reference
from tuili.pipeline.export import export_onnx
from tuili.pipeline.gguf_export import export_gguf
from tuili.pipeline.recipe import Recipe, load_recipe
from tuili.pipeline.report import human_bytes, markdown_table
from tuili.pipeline.sensitivity import LayerCost, layer_costs
from tuili.pipeline.stages import Transform
from tuili.quant.linear import quantized_layers


@dataclass
class StageResult:
    name: str
    num_bytes: int
    quality: Perplexity
    speed: Speed
    seconds: float = 0.0  # time the stage itself took (0 for the baseline)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_bytes": self.num_bytes,
            "seconds": self.seconds,
            "quality": self.quality.to_dict(),
            "speed": self.speed.to_dict(),
        }


@dataclass
class OptimizeReport:
    model: str
    data: str
    analysis: Analysis
    stages: list[StageResult] = field(default_factory=list)
    recipe: str | None = None
    saved_to: str | None = None
    exports: list[dict] = field(default_factory=list)  # {"path", "max_abs_diff"} per file exported (ONNX, GGUF)
    sensitivity: list[LayerCost] = field(default_factory=list)  # per linear layer, measured on the input model

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "data": self.data,
            "recipe": self.recipe,
            "saved_to": self.saved_to,
            "exports": self.exports,
            "analysis": self.analysis.to_dict(),
            "sensitivity": [c.to_dict() for c in self.sensitivity],
            "stages": [s.to_dict() for s in self.stages],
        }

    def stage_table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows of the per-stage table, every figure beside the baseline's."""
        base = self.stages[0]
        q = base.quality
        rows = []
        for s in self.stages:
            ppl, dec, pre = s.quality.perplexity, s.speed.decode_tokens_per_second, s.speed.prefill_tokens_per_second
            concurrent = [
                f"{s.speed.throughput[b]:.1f} ({s.speed.throughput[b] / base.speed.throughput[b]:.2f}×)"
                for b in base.speed.throughput
            ]
            peak = s.speed.peak_memory_bytes
            rows.append(
                [
                    s.name,
                    human_bytes(s.num_bytes),
                    f"{ppl:.3f}",
                    f"{100 * (ppl / q.perplexity - 1):+.2f}%",
                    f"{pre:.0f}",
                    f"{dec:.1f}",
                    f"{s.speed.decode_speedup(base.speed):.2f}×",
                    *concurrent,
                    f"{1000 * s.speed.time_to_first_token:.0f} ms",
                    human_bytes(peak) if peak else "n/a",
                    f"{s.seconds:.1f} s",
                ]
            )
        headers = [
            "stage",
            "weights",
            "perplexity",
            "Δ perplexity",
            "prefill tok/s",
            "decode tok/s",
            "decode vs baseline",
            *[f"{b} concurrent, out tok/s" for b in base.speed.throughput],
            "time to first token",
            "peak memory",
            "stage time",
        ]
        return headers, rows

    def measured_on(self) -> str:
        q, speed = self.stages[0].quality, self.stages[0].speed
        paired = any(s.speed.baseline_decode_tokens_per_second for s in self.stages[1:])
        return (
            f"Perplexity on {self.data} ({q.num_windows} windows × {q.seq_len} tokens, {q.num_tokens:,} scored); "
            f"prefill of {speed.prefill_tokens} tokens; decode at batch 1"
            + (", each stage's against the baseline timed in turns with it." if paired else ".")
        )

    def notes(self) -> list[str]:
        """Where the model was saved and exported."""
        lines = [f"Saved to {self.saved_to}"] if self.saved_to else []
        return lines + [
            f"Exported to {e['path']} (its logits within {e['max_abs_diff']:.1e} of tuili's)" for e in self.exports
        ]

    def to_markdown(self) -> str:
        recipe = f"Recipe: {self.recipe}\n\n" if self.recipe else ""
        notes = "".join(f"\n{line}\n" for line in self.notes())
        return (
            f"# tuili optimize: {self.model}\n\n{recipe}## Analysis\n\n{analysis_markdown(self.analysis)}\n\n"
            f"## Stages\n\n{self.measured_on()}\n\n{markdown_table(*self.stage_table())}\n{notes}"
        )


def measure(
    model: Model,
    name: str,
    windows,
    progress: bool,
    seconds: float = 0.0,
    batch_sizes: Sequence[int] = (),
    reference: Model | None = None,
) -> StageResult:
    return StageResult(
        name,
        analyze(model).num_bytes,
        perplexity(model.module, windows, progress=progress),
        measure_speed(model, batch_sizes=batch_sizes, reference=reference),
        seconds,
    )


def optimize(
    model: Model,
    recipe: Recipe | str | Path | Sequence[Transform] = (),
    data: str = "builtin",
    seq_len: int = 512,
    max_tokens: int | None = 16384,
    context_len: int = 2048,
    progress: bool = True,
    batch_sizes: Sequence[int] = (),
    sensitivity: bool = True,
) -> OptimizeReport:
    """Analyze `model`, measure it, then apply and measure each stage in turn.

    `recipe`: a Recipe, a recipe file or the name of a shipped one (tuili.pipeline.recipe), or
    stage configs (`QuantizeStage("w8a16")`, `PruneStage("0.5")`, ... from tuili.pipeline.stages).
    A recipe's analyze and benchmark settings replace
    `context_len`, `seq_len`, `max_tokens` and `batch_sizes` (concurrent requests whose output
    tokens/s are measured too); its save and export stages write the model at the end.
    `sensitivity`: also measure each linear layer's sensitivity to int8/int4 (tuili.pipeline.sensitivity,
    for the report's plot; about 20 s on the default model)."""
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    save_to, exports = None, []
    if isinstance(recipe, Recipe):
        context_len = recipe.settings("analyze").get("context_len", context_len)
        sensitivity = recipe.settings("analyze").get("sensitivity", sensitivity)
        bench = recipe.settings("benchmark")
        seq_len, max_tokens = bench.get("seq_len", seq_len), bench.get("max_tokens", max_tokens)
        batch_sizes = bench.get("batch_sizes", batch_sizes)
        stages, save_to, exports, name = recipe.transforms(), recipe.save_path, recipe.export_paths, recipe.name
    else:
        stages, name = list(recipe), None
    windows = eval_windows(model.tokenizer.encode(load_text(data, "evaluation")), seq_len, max_tokens)
    report = OptimizeReport(model.source, data, analyze(model, context_len=context_len), recipe=name)
    if sensitivity and not quantized_layers(model.module):
        calib = calibration_samples(model.tokenizer.encode(load_text(data, "calibration")), 8, min(256, seq_len))
        report.sensitivity = layer_costs(model, calib, time_layers=False)
    report.stages.append(measure(model, "baseline", windows, progress, batch_sizes=batch_sizes))
    reference = speed_reference(model) if stages else None  # the baseline, timed in turns with each stage
    for stage in stages:
        start = time.perf_counter()
        stage_name = stage.run(model, data)
        report.stages.append(
            measure(model, stage_name, windows, progress, time.perf_counter() - start, batch_sizes, reference)
        )
    del reference
    if save_to:
        report.saved_to = str(model.save(save_to))
    for path in exports:
        written = export_gguf(model, path) if str(path).endswith(".gguf") else export_onnx(model, path)
        report.exports.append({"path": str(written.path), "max_abs_diff": written.max_abs_diff})
    return report


__all__ = ["OptimizeReport", "StageResult", "optimize"]
