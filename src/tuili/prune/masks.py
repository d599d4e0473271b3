"""Masks from importance scores, and masks that stay: pruned weights never come back in training.

A mask keeps exactly the number of weights asked for: `topk` picks them, so equal scores (ties)
cannot make the sparsity drift from its target.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook


def keep_top(scores: Tensor, keep: int) -> Tensor:
    """A bool mask of `scores`' shape with exactly `keep` True entries, the highest scores."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[torch.topk(flat.float(), keep, sorted=False).indices] = True
    return mask.view_as(scores)


def unstructured_mask(scores: Tensor, sparsity: float, per_row: bool = False) -> Tensor:
    """Keep the highest-scoring (1 − sparsity) of the weights; `per_row` compares within each
    output row (Wanda's comparison group) rather than over the whole matrix."""
    if not per_row:
        return keep_top(scores, scores.numel() - round(sparsity * scores.numel()))
    rows, cols = scores.shape
    keep = cols - round(sparsity * cols)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(1, torch.topk(scores.float(), keep, dim=1, sorted=False).indices, True)
    return mask


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the n highest scores in every group of m consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs the input width ({cols}) to be a multiple of M ({m})")
    groups = scores.float().reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, sorted=False).indices, True)
    return mask.reshape(rows, cols)


def global_masks(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """One threshold over every layer's scores: exactly round(sparsity × total) weights removed in
    all, layers with lower scores losing more."""
    total = sum(s.numel() for s in scores.values())
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    keep = keep_top(flat, total - round(sparsity * total))
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


# ---- masks that survive training -------------------------------------------------------------
_MASKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_STEP_HOOK = None


def attach_mask(linear: nn.Linear, mask: Tensor) -> None:
    """Zero the weights the mask removes and keep them zero through training: the mask is a buffer
    of the module (`weight_mask`), gradients of removed weights are zeroed, and after every
    optimizer step (any torch optimizer) the mask is applied again, so momentum, weight decay or
    a manual edit cannot revive a pruned weight."""
    global _STEP_HOOK
    mask = mask.to(device=linear.weight.device, dtype=torch.bool)
    if mask.shape != linear.weight.shape:
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit weight {tuple(linear.weight.shape)}")
    if hasattr(linear, "weight_mask"):
        linear.weight_mask &= mask
    else:
        linear.register_buffer("weight_mask", mask, persistent=False)
        linear.weight.register_hook(lambda grad, module=linear: grad * module.weight_mask)
    with torch.no_grad():
        linear.weight.mul_(linear.weight_mask)
    _MASKED.add(linear)
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(lambda *_: reapply_masks())


@torch.no_grad()
def reapply_masks() -> None:
    for module in list(_MASKED):
        module.weight.mul_(module.weight_mask)


def restore_masks(model) -> int:
    """After `tuili.load` of a folder saved pruned: mask every layer its sparsity_config names at its
    zeros, so further fine-tuning keeps them. Returns the number of layers masked (0: not sparse)."""
    qconfig = model.config.extra.get("quantization_config") or {}
    sparsity = qconfig.get("sparsity_config") or {}
    names = sparsity.get("targets") or []
    modules = dict(model.module.named_modules())
    for name in names:
        linear = modules.get(name)
        if isinstance(linear, nn.Linear):
            attach_mask(linear, linear.weight != 0)
    return sum(isinstance(modules.get(n), nn.Linear) for n in names)
