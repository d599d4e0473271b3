"""Masks from importance scores, and masks that stay: pruned weights never come back in training.

A mask keeps exactly the number of weights asked for: `topk` picks them, so equal scores (ties)
cannot make the sparsity drift from its target.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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


def attach_mask(linear: nn.Linear, mask: Tensor) -> None:
    """Zero the weights the mask removes and keep them zero through training: the mask is a buffer
    of the module (`weight_mask`), and gradients of removed weights are zeroed. Whoever trains
    re-applies the masks after each optimizer step (`keep_masks`), so momentum, weight decay or a
    manual edit cannot revive a pruned weight."""
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


def masks_of(module: nn.Module) -> dict[str, Tensor]:
    """Every masked layer's mask (True = kept), by name."""
    return {
        name: m.weight_mask for name, m in module.named_modules() if isinstance(getattr(m, "weight_mask", None), Tensor)
    }


@torch.no_grad()
def reapply_masks(module: nn.Module) -> None:
    """Zero again every weight a mask of `module` removed."""
    for m in module.modules():
        mask = getattr(m, "weight_mask", None)
        if isinstance(mask, Tensor):
            m.weight.mul_(mask)


def keep_masks(optimizer: torch.optim.Optimizer, module: nn.Module):
    """Re-apply `module`'s masks after every step of this optimizer (a hook on it alone; returns
    its handle). Training loops over pruned models call this once."""
    return optimizer.register_step_post_hook(lambda *_: reapply_masks(module))


def restore_masks(model) -> int:
    """After `tuili.load` of a folder saved pruned: mask every layer its sparsity_config names at its
    zeros, so further fine-tuning keeps them. Returns the number of layers masked (0: not sparse)."""
    qconfig = model.config.extra.get("quantization_config") or {}
    sparsity = qconfig.get("sparsity_config") or {}
    targets = set(sparsity.get("targets") or [])  # stored names (a Phi-3 qkv_proj masks q, k and v)
    masked = [
        m for n, m in model.module.named_modules() if isinstance(m, nn.Linear) and model.stored_name(n) in targets
    ]
    for linear in masked:
        attach_mask(linear, linear.weight != 0)
    return len(masked)
