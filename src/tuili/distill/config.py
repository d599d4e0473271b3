"""What a distillation run is asked to do (`DistillConfig`), what it reports (`DistillResult`), the
columns of its step log, and the settings a resumed run must keep."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tuili.distill.losses import ATTENTION_LOSSES, HIDDEN_LOSSES
from tuili.distill.students import DistillError

LOG_FIELDS = (
    "step",
    "epoch",
    "lr",
    "loss",
    "soft",
    "hard",
    "attention",
    "hidden",
    "grad_norm",
    "tokens",
    "tokens_per_second",
    "seconds",
    "student_perplexity",
    "teacher_perplexity",
)
# Settings that change the maths of a run: a resumed run must keep them.
_FIXED = (
    "lr",
    "min_lr",
    "warmup_steps",
    "weight_decay",
    "batch_size",
    "grad_accum",
    "max_grad_norm",
    "temperature",
    "alpha",
    "attention_loss",
    "attention_weight",
    "hidden_loss",
    "hidden_weight",
    "bf16",
    "cache_top_k",
    "seed",
    "steps",
)


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run. `batch_size` is sequences per process per micro-step; an optimizer
    step sees batch_size × grad_accum × processes sequences."""

    steps: int = 200
    lr: float = 1e-4
    min_lr: float = 1e-5  # where the cosine decay ends
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (teacher) loss; 1 − alpha on the labels
    attention_loss: str | None = None  # mse | kl | cosine
    attention_weight: float = 1.0
    hidden_loss: str | None = None  # mse | cosine
    hidden_weight: float = 1.0
    bf16: bool | None = None  # None: where the processor has bf16 instructions (or a CUDA GPU)
    eval_every: int = 50
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    logits_cache: str | None = None  # a folder; the teacher's top-k logits are kept there
    cache_top_k: int = 64
    seed: int = 0

    def __post_init__(self):
        positive = ("steps", "batch_size", "grad_accum", "cache_top_k", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise DistillError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise DistillError(f"need 0 ≤ min_lr ≤ lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.alpha <= 1:
            raise DistillError(f"alpha weighs the soft loss and must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise DistillError(f"the temperature must be positive, got {self.temperature}")
        if self.attention_loss not in (None, *ATTENTION_LOSSES):
            raise DistillError(
                f"attention loss must be one of {', '.join(ATTENTION_LOSSES)}, got {self.attention_loss!r}"
            )
        if self.hidden_loss not in (None, *HIDDEN_LOSSES):
            raise DistillError(f"hidden-state loss must be one of {', '.join(HIDDEN_LOSSES)}, got {self.hidden_loss!r}")
        if self.logits_cache and (self.attention_loss or self.hidden_loss):
            raise DistillError(
                "the logits cache holds logits only: attention and hidden-state losses need the "
                "teacher's forward pass at every step (drop --logits-cache or those losses)"
            )
        if self.warmup_steps < 0 or self.eval_every < 0 or self.checkpoint_every < 0:
            raise DistillError("warmup_steps, eval_every and checkpoint_every cannot be negative")

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.attention_loss is not None or self.hidden_loss is not None

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then cosine from lr to min_lr at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class DistillResult:
    steps: int
    tokens: int
    seconds: float  # training time (evaluation excluded) of this process's run, resumed parts only
    student_perplexity: float | None
    teacher_perplexity: float | None
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0
