"""`prune_(model, target, method)`: score every targeted linear layer, mask it, keep the mask.

magnitude and taylor score the whole model at once; wanda and sparsegpt calibrate one decoder
layer at a time (as `quantize_` does): each layer is pruned from the inputs it receives, and its
pruned output is what the next layer receives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tuili.models.model import Model
from tuili.prune.config import SemiStructured, Target, Unstructured
from tuili.prune.importance import InputNorms, magnitude, taylor, wanda
from tuili.prune.masks import attach_mask, global_masks, nm_mask, unstructured_mask
from tuili.prune.sparsegpt import sparsegpt
from tuili.quant.api import DEFAULT_IGNORE, select_linears
from tuili.quant.calibration import LayerRunner, input_hooks, require_tuili_model
from tuili.quant.gptq import Hessian

METHODS = ("magnitude", "taylor", "wanda", "sparsegpt")
CALIBRATED = ("taylor", "wanda", "sparsegpt")


def prune_(
    model: Model | nn.Module,
    target: Target,
    method: str = "magnitude",
    *,
    calib: Tensor | None = None,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Prune the model's linear layers in place to `target`; returns each layer's mask (True = kept).

    calib: (N, T) token ids, needed by taylor, wanda and sparsegpt. The masks stay with the
    modules (`weight_mask`): fine-tuning afterwards cannot revive a pruned weight.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}: choose one of {', '.join(METHODS)}")
    if method in CALIBRATED and calib is None:
        raise ValueError(f"{method} needs calibration token ids (calib=...): e.g. tuili.data.calibration_samples")
    if isinstance(target, Unstructured) and target.scope == "global" and method == "sparsegpt":
        raise ValueError(
            "sparsegpt prunes layer by layer with its own update: use scope='layer' (or wanda/magnitude "
            "for a global threshold)"
        )
    module = model.module if isinstance(model, Model) else model
    linears = select_linears(module, targets, ignore)
    if not linears:
        raise ValueError("no linear layers match the targets: nothing to prune")
    if method in ("wanda", "sparsegpt"):
        masks = _sequential(require_tuili_model(module, method), linears, target, method, calib, progress)
    else:
        scores = (
            {n: magnitude(m.weight) for n, m in linears.items()}
            if method == "magnitude"
            else taylor(module, linears, calib, progress=progress)
        )
        masks = _masks(scores, target, per_row=False)
        for name, mask in masks.items():
            attach_mask(linears[name], mask)
    if isinstance(model, Model):
        structure = f"{target.n}:{target.m}" if isinstance(target, SemiStructured) else "unstructured"
        model.record("pruned", method=method, target=_describe(target), sparsity_structure=structure, layers=len(masks))
    return masks


def _masks(scores: dict[str, Tensor], target: Target, per_row: bool) -> dict[str, Tensor]:
    if isinstance(target, SemiStructured):
        return {n: nm_mask(s, target.n, target.m) for n, s in scores.items()}
    if target.scope == "global":
        return global_masks(scores, target.sparsity)
    return {n: unstructured_mask(s, target.sparsity, per_row) for n, s in scores.items()}


def _sequential(
    module, linears: dict[str, nn.Linear], target: Target, method: str, calib: Tensor, progress: bool
) -> dict[str, Tensor]:
    outside = sorted(n for n in linears if not n.startswith("model.layers."))
    if outside:
        raise ValueError(
            f"{method} calibrates decoder layers only; these targets are outside them: "
            f"{', '.join(outside)} (prune them with magnitude, or ignore them)"
        )
    runner = LayerRunner(module, calib)
    masks: dict[str, Tensor] = {}
    global_scores: dict[str, Tensor] = {}
    for i, layer in runner.layers(method, progress):
        prefix = f"model.layers.{i}."
        local = {name[len(prefix) :]: m for name, m in linears.items() if name.startswith(prefix)}
        if not local:
            continue
        stats = {n: (Hessian if method == "sparsegpt" else InputNorms)(m.in_features) for n, m in local.items()}
        with input_hooks(local, lambda name, x, stats=stats: stats[name].add(x)):
            runner.run(layer)
        for name, m in local.items():
            if method == "sparsegpt":
                weight, mask = sparsegpt(m.weight, stats[name].value(), target)
                with torch.no_grad():
                    m.weight.copy_(weight.to(m.weight.dtype))
                attach_mask(m, mask)
                masks[prefix + name] = mask
            else:
                global_scores[prefix + name] = wanda(m.weight, stats[name].value())
        if method == "wanda" and not (isinstance(target, Unstructured) and target.scope == "global"):
            # prune this layer now, so the next layer calibrates on pruned outputs
            layer_masks = _masks({n: global_scores.pop(prefix + n) for n in local}, target, per_row=True)
            for name, mask in layer_masks.items():
                attach_mask(local[name], mask)
                masks[prefix + name] = mask
    if global_scores:  # wanda with one global threshold: all scores first, then the masks
        for name, mask in _masks(global_scores, target, per_row=False).items():
            attach_mask(linears[name], mask)
            masks[name] = mask
    return masks


def _describe(target: Target) -> str:
    if isinstance(target, SemiStructured):
        return f"{target.n}:{target.m}"
    return f"{target.sparsity:g} unstructured ({target.scope})"
