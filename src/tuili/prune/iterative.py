"""Iterative pruning (the user's iterative_pruning): sparsity rises in stages, and a recovery step
between stages fine-tunes the surviving weights on text (masks keep the pruned ones at zero).

Stage k of K prunes to sparsity s · k / K. Scores are taken on the current weights, where pruned
weights are zero (the lowest score), so each stage's mask contains the previous one.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from tuili.data.perplexity import perplexity
from tuili.models.model import Model
from tuili.prune.api import prune_
from tuili.prune.config import Target, Unstructured
from tuili.prune.masks import keep_masks, masks_of
from tuili.prune.report import sparsity_report


@dataclass
class Stage:
    sparsity: float  # of the targeted layers, measured
    perplexity: float | None  # on the evaluation windows, after recovery
    loss: float | None  # the last recovery batch's loss


def recover_(
    model: Model, tokens: Tensor, steps: int, lr: float = 1e-5, batch_size: int = 4, progress: bool = True
) -> float:
    """Fine-tune on (N, T) token windows for `steps` AdamW steps (next-token loss); returns the last loss."""
    module = model.module
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    keep_masks(optimizer, module)
    loss_value = float("nan")
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in tqdm(range(steps), desc="recovery", unit="step", disable=not progress, leave=False):
            batch = tokens[torch.randint(0, tokens.shape[0], (batch_size,), generator=generator)].to(module.device)
            logits = module(batch).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()  # keep_masks re-applies the masks after every step
            loss_value = float(loss.detach())
    finally:
        module.eval()
    return loss_value


def iterative_prune_(
    model: Model,
    target: Target,
    method: object,
    stages: int,
    *,
    calib: Tensor | None = None,
    train: Tensor | None = None,
    steps: int = 20,
    lr: float = 1e-5,
    eval_windows: Tensor | None = None,
    progress: bool = True,
) -> list[Stage]:
    """Prune to `target` in `stages` rising steps with recovery fine-tuning between them (on `train`
    windows, `steps` steps each); logs each stage's sparsity and, with `eval_windows`, perplexity."""
    if stages < 1:
        raise ValueError(f"stages must be at least 1, got {stages}")
    if not isinstance(target, Unstructured):
        raise ValueError("iterative pruning raises an unstructured sparsity stage by stage; N:M is one step")
    log = []
    for k in range(1, stages + 1):
        stage_target = dataclasses.replace(target, sparsity=target.sparsity * k / stages)
        prune_(model, stage_target, method, calib=calib, progress=progress)
        masks = masks_of(model.module)
        loss = recover_(model, train, steps, lr, progress=progress) if train is not None and steps > 0 else None
        ppl = perplexity(model.module, eval_windows, progress=progress).perplexity if eval_windows is not None else None
        report = sparsity_report(model.module)
        targeted = [layer for layer in report.layers if layer.name in masks]
        sparsity = sum(layer.zeros for layer in targeted) / sum(layer.params for layer in targeted)
        log.append(Stage(sparsity, ppl, loss))
        if progress:
            print(
                f"stage {k}/{stages}: sparsity {sparsity:.1%}"
                + (f", perplexity {ppl:.3f}" if ppl is not None else "")
                + (f", recovery loss {loss:.3f}" if loss is not None else ""),
                file=sys.stderr,
                flush=True,
            )
    return log
