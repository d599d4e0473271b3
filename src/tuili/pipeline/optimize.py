"""`tuili optimize`: the main job. Today it analyzes, evaluates and times the model and reports;
each compression capability adds its stage between analysis and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from tuili.data import eval_windows, load_text, perplexity
from tuili.data.perplexity import Perplexity
from tuili.models.model import Model
from tuili.pipeline.analysis import Analysis, analysis_markdown, analyze
from tuili.pipeline.bench import Speed, measure_speed
from tuili.pipeline.report import markdown_table


@dataclass
class OptimizeReport:
    model: str
    analysis: Analysis
    quality: Perplexity
    speed: Speed
    data: str

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "analysis": self.analysis.to_dict(),
                "quality": self.quality.to_dict(), "speed": self.speed.to_dict()}

    def to_markdown(self) -> str:
        q, s = self.quality, self.speed
        quality = markdown_table(["data", "windows × length", "tokens scored", "perplexity", "tokens/s"], [
            [self.data, f"{q.num_windows} × {q.seq_len}", f"{q.num_tokens:,}", f"{q.perplexity:.3f}",
             f"{q.tokens_per_second:.0f}"]])
        speed = markdown_table(["prefill tokens", "prefill tok/s", "time to first token", "decode tok/s (batch 1)"], [
            [s.prefill_tokens, f"{s.prefill_tokens_per_second:.0f}", f"{1000 * s.time_to_first_token:.0f} ms",
             f"{s.decode_tokens_per_second:.1f}"]])
        return (f"# tuili optimize: {self.model}\n\n## Analysis\n\n{analysis_markdown(self.analysis)}\n\n"
                f"## Quality\n\n{quality}\n\n## Speed\n\n{speed}\n")


def optimize(model: Model, data: str = "builtin", seq_len: int = 512, max_tokens: int | None = 16384,
             context_len: int = 2048, progress: bool = True) -> OptimizeReport:
    """Analyze `model`, measure its perplexity on `data` and its speed; return the report."""
    analysis = analyze(model, context_len=context_len)
    windows = eval_windows(model.tokenizer.encode(load_text(data, "evaluation")), seq_len, max_tokens)
    quality = perplexity(model.module, windows, progress=progress)
    speed = measure_speed(model)
    return OptimizeReport(model.source, analysis, quality, speed, data)
