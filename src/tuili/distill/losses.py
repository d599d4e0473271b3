"""Distillation losses: logits (soft and hard), attention maps and hidden states.

Every loss takes an optional boolean `mask` (B, T) of the positions that count (padding is False)
and reduces per token: a sum over the distribution or the features of one position, then a mean
over the positions that count, so a batch's padding never changes the value.

- soft: KL(p_T ‖ q_T) · T², with p_T = softmax(teacher / T), q_T = softmax(student / T); T² keeps
  the gradient's scale independent of T (Hinton et al., 2015)
- hard: cross-entropy of the student's logits with the next-token labels
- total: α · soft + (1 − α) · hard
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_LOSSES = ("mse", "kl", "cosine")
HIDDEN_LOSSES = ("mse", "cosine")
IGNORE_INDEX = -100  # labels that take no part in the hard loss (PyTorch's convention)


class TopKLogits(NamedTuple):
    """A teacher's logits kept sparse (what a logits cache stores): the top-k values and their vocabulary
    indices, (B, T, k), and the log-sum-exp of all logits at the distillation temperature, (B, T).

    The soft loss then compares the two distributions over k + 1 bins (the k tokens and "the rest"):
    the exact KL of those coarser distributions, never more than the full one, equal to it when k = V.
    """

    values: Tensor
    indices: Tensor
    logsumexp: Tensor

    @classmethod
    def of(cls, logits: Tensor, k: int, temperature: float) -> TopKLogits:
        logits = logits.float()
        values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
        return cls(values, indices, torch.logsumexp(logits / temperature, dim=-1))

    def without_last(self) -> TopKLogits:
        """All positions but the last (the one with no next token to predict)."""
        return TopKLogits(self.values[:, :-1], self.indices[:, :-1], self.logsumexp[:, :-1])


def _masked_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the positions where `mask` is True (all of them without a mask)."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.device, torch.bool)
    count = mask.sum()
    if count == 0:
        raise ValueError("the mask leaves no position to compute the loss on")
    return per_token.masked_fill(~mask, 0.0).sum() / count


def soft_loss(
    student_logits: Tensor, teacher_logits: Tensor | TopKLogits, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) · T², summed over the vocabulary, mean over positions."""
    if temperature <= 0:
        raise ValueError(f"the temperature must be positive, got {temperature}")
    if isinstance(teacher_logits, TopKLogits):
        kl = _topk_kl(F.log_softmax(student_logits.float() / temperature, dim=-1), teacher_logits, temperature)
    else:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                f"{tuple(student_logits.shape)} differ: distillation needs one vocabulary"
            )
        kl = _KL.apply(student_logits, teacher_logits.detach(), temperature)
    return _masked_mean(kl, mask) * temperature**2


class _KL(torch.autograd.Function):
    """KL(softmax(t/T) ‖ softmax(s/T)) per position, in fp32 over chunks of positions.

    Autograd would keep several fp32 (positions × vocabulary) tensors for the backward pass (400 MB
    each for 8 × 256 tokens of a 49k vocabulary); this recomputes them a chunk at a time from the
    logits instead: ∂KL/∂s = (softmax(s/T) − softmax(t/T)) / T.
    """

    CHUNK = 256  # positions per chunk: 256 × 49,152 fp32 values is 48 MiB

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(student, teacher)
        ctx.temperature = temperature
        s2, t2 = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        out = torch.empty(s2.shape[0], dtype=torch.float32, device=student.device)
        for i in range(0, s2.shape[0], _KL.CHUNK):
            s = F.log_softmax(s2[i : i + _KL.CHUNK].float() / temperature, dim=-1)
            t = F.log_softmax(t2[i : i + _KL.CHUNK].float() / temperature, dim=-1)
            out[i : i + _KL.CHUNK] = (t.exp() * (t - s)).sum(-1)
        return out.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        student, teacher = ctx.saved_tensors
        temperature = ctx.temperature
        s2, t2 = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        g = grad.reshape(-1, 1).float()
        out = torch.empty_like(s2)
        for i in range(0, s2.shape[0], _KL.CHUNK):
            q = torch.softmax(s2[i : i + _KL.CHUNK].float() / temperature, dim=-1)
            p = torch.softmax(t2[i : i + _KL.CHUNK].float() / temperature, dim=-1)
            out[i : i + _KL.CHUNK] = (q.sub_(p).mul_(g[i : i + _KL.CHUNK] / temperature)).to(out.dtype)
        return out.view(student.shape), None, None


def _topk_kl(student_logp: Tensor, teacher: TopKLogits, temperature: float) -> Tensor:
    """KL over the k teacher tokens plus one bin for the rest of the vocabulary, per position."""
    t_logp = teacher.values.float() / temperature - teacher.logsumexp.float()[..., None]
    s_logp = student_logp.gather(-1, teacher.indices.long())
    t_rest = torch.log1p(-t_logp.exp().sum(-1).clamp(max=1 - 1e-6))
    s_rest = torch.log1p(-s_logp.exp().sum(-1).clamp(max=1 - 1e-6))
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1) + t_rest.exp() * (t_rest - s_rest)


def hard_loss(student_logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy with `labels` (B, T) at each position (labels equal to -100 and masked positions skipped)."""
    ce = F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten().clamp(min=0), reduction="none").view(
        labels.shape
    )
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask.to(valid.device, torch.bool)
    return _masked_mean(ce, valid)


@dataclass
class LogitLosses:
    total: Tensor
    soft: Tensor
    hard: Tensor


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits,
    labels: Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
    mask: Tensor | None = None,
) -> LogitLosses:
    """α · soft + (1 − α) · hard. (The user's text writes α on the hard loss in its formula and on the
    soft loss in its code; tuili follows the code and Hinton's paper: α weighs the teacher.)"""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha weighs the soft loss and must be in [0, 1], got {alpha}")
    soft = soft_loss(student_logits, teacher_logits, temperature, mask)
    hard = hard_loss(student_logits, labels, mask)
    return LogitLosses(alpha * soft + (1 - alpha) * hard, soft, hard)


def _match_heads(student: Tensor, teacher: Tensor, head_map: list[int] | None) -> tuple[Tensor, Tensor]:
    """Bring two (B, H, T, S) maps to the same heads: the teacher heads `head_map` names for each
    student head; else equal counts as they are, or teacher heads averaged in groups when the
    teacher has a multiple of the student's heads, or both averaged over heads."""
    hs, ht = student.shape[1], teacher.shape[1]
    if head_map is not None:
        if len(head_map) != hs or not all(0 <= h < ht for h in head_map):
            raise ValueError(f"a head map needs one teacher head (0..{ht - 1}) per student head ({hs}); got {head_map}")
        return student, teacher[:, list(head_map)]
    if hs == ht:
        return student, teacher
    if ht % hs == 0:
        b, _, t, s = teacher.shape
        return student, teacher.view(b, hs, ht // hs, t, s).mean(2)
    return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)


def attention_loss(
    student: Tensor, teacher: Tensor, kind: str = "mse", mask: Tensor | None = None, head_map: list[int] | None = None
) -> Tensor:
    """Distance between attention probabilities (B, H, T, S) of one layer pair, per query row:
    mse Σ_s (a − b)², kl KL(teacher ‖ student), cosine 1 − cos(a, b); mean over heads and the rows
    `mask` keeps."""
    if kind not in ATTENTION_LOSSES:
        raise ValueError(f"attention loss must be one of {', '.join(ATTENTION_LOSSES)}, got {kind!r}")
    if student.shape[-2:] != teacher.shape[-2:] or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"attention maps {tuple(student.shape)} and {tuple(teacher.shape)} cover different tokens")
    student, teacher = _match_heads(student.float(), teacher.float(), head_map)
    if kind == "mse":
        row = (student - teacher).pow(2).sum(-1)
    elif kind == "kl":
        row = (torch.xlogy(teacher, teacher) - torch.xlogy(teacher, student.clamp(min=1e-12))).sum(-1)
    else:
        row = 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    return _masked_mean(row.mean(1), mask)  # (B, T) after the head mean


def hidden_loss(student: Tensor, teacher: Tensor, kind: str = "cosine", mask: Tensor | None = None) -> Tensor:
    """Distance between hidden states (B, T, D) of one layer pair (the student's already projected to
    the teacher's width): mse mean_d (a − b)², cosine 1 − cos(a, b); mean over the positions kept."""
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"hidden-state loss must be one of {', '.join(HIDDEN_LOSSES)}, got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"hidden states {tuple(student.shape)} and {tuple(teacher.shape)} differ: "
            "give the student a projection to the teacher's width"
        )
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        per_token = (student - teacher).pow(2).mean(-1)
    else:
        per_token = 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    return _masked_mean(per_token, mask)


__all__ = [
    "ATTENTION_LOSSES",
    "HIDDEN_LOSSES",
    "IGNORE_INDEX",
    "LogitLosses",
    "TopKLogits",
    "attention_loss",
    "distillation_loss",
    "hard_loss",
    "hidden_loss",
    "soft_loss",
]
