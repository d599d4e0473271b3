"""Knowledge distillation: losses, students made from the teacher, and the trainer."""

from tuili.distill.cache import LogitsCache
from tuili.distill.losses import (
    TopKLogits,
    attention_loss,
    distillation_loss,
    hard_loss,
    hidden_loss,
    soft_loss,
)
from tuili.distill.students import (
    Alignment,
    DistillError,
    alignment,
    check_pair,
    student_from_sizes,
    student_from_teacher,
)
from tuili.distill.trainer import DistillConfig, Distiller, DistillResult, distill_

__all__ = [
    "Alignment",
    "DistillConfig",
    "DistillError",
    "DistillResult",
    "Distiller",
    "LogitsCache",
    "TopKLogits",
    "alignment",
    "attention_loss",
    "check_pair",
    "distill_",
    "distillation_loss",
    "hard_loss",
    "hidden_loss",
    "soft_loss",
    "student_from_sizes",
    "student_from_teacher",
]
