"""How much each weight matters: the scores a mask keeps the highest of.

- magnitude: |W|
- wanda (Sun et al., 2023): |W_ij| · ‖X_j‖₂, the weight times the norm of its input over
  calibration tokens: a small weight on a large activation still matters
- taylor: Σ_batches |W ⊙ ∂L/∂W|, the first-order estimate of the loss change if the weight went
  to zero, accumulated over calibration batches
(The Hessian-based score, OBS's w² / [H⁻¹]_jj², lives in `tuili.prune.sparsegpt` with the update
that compensates the removed weights.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm


def magnitude(w: Tensor) -> Tensor:
    return w.detach().abs().float()


class InputNorms:
    """Running Σ x_j² over a layer's input rows (Wanda's ‖X_j‖₂ is its square root)."""

    def __init__(self, in_features: int):
        self.sq = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0

    def add(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        self.sq += (rows.float() ** 2).sum(0).double().cpu()
        self.count += rows.shape[0]

    def value(self) -> Tensor:
        return self.sq.sqrt().float()


def wanda(w: Tensor, input_norms: Tensor) -> Tensor:
    return w.detach().abs().float() * input_norms.to(w.device)[None, :]


def taylor(
    module: nn.Module, linears: dict[str, nn.Linear], calib: Tensor, batch_size: int = 2, progress: bool = True
) -> dict[str, Tensor]:
    """|W ⊙ ∂L/∂W| summed over calibration batches, L the next-token cross-entropy, for each linear."""
    scores = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in linears.items()}
    flags = {name: m.weight.requires_grad for name, m in linears.items()}
    others = [p for p in module.parameters() if p.requires_grad]
    for p in others:
        p.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(True)
    try:
        batches = range(0, calib.shape[0], batch_size)
        for start in tqdm(batches, desc="taylor scores", unit="batch", disable=not progress, leave=False):
            ids = calib[start : start + batch_size].to(module.device)
            logits = module(ids).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
            grads = torch.autograd.grad(loss, [m.weight for m in linears.values()])
            for (name, m), g in zip(linears.items(), grads):
                scores[name] += (m.weight.detach() * g).abs().float()
    finally:
        for name, m in linears.items():
            m.weight.requires_grad_(flags[name])
        for p in others:
            p.requires_grad_(True)
    return scores
