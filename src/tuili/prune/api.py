"""`prune_(model, target, method)`: score every targeted linear layer, mask it, keep the mask.

magnitude and taylor score the whole model at once; wanda and sparsegpt calibrate one decoder
layer at a time (as `quantize_` does): each layer is pruned from the inputs it receives, and its
pruned output is what the next layer receives. Methods are configs registered to their handlers
(tuili.prune.methods).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from tuili.models.layerwise import LayerRunner, input_hooks, require_tuili_model
from tuili.models.lazy import onload_all
from tuili.models.model import Model
from tuili.models.selection import DEFAULT_IGNORE, select_linears
from tuili.prune.config import SemiStructured, Target, Unstructured
from tuili.prune.importance import magnitude
from tuili.prune.masks import attach_mask
from tuili.prune.methods import LayerwiseHandler, Magnitude, handler_for, target_masks


def prune_(
    model: Model | nn.Module,
    target: Target | float,
    method: object = Magnitude(),
    *,
    calib: Tensor | None = None,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    progress: bool = True,
) -> Model | nn.Module:
    """Prune the model's linear layers in place to `target` and return the model.

    target: a fraction of each layer's weights (0.5, the same as Unstructured(0.5)), Unstructured
    (per layer or global) or SemiStructured (N:M).
    method: Magnitude (default), Taylor, Wanda or SparseGPT (tuili.prune). calib: (N, T) token ids,
    needed by Taylor, Wanda and SparseGPT. Each layer's mask stays with it (`weight_mask`;
    `tuili.prune.masks_of(model)` lists them): fine-tuning with `keep_masks` cannot revive a
    pruned weight.
    """
    if isinstance(target, int | float) and not isinstance(target, bool):
        target = Unstructured(float(target))
    if not isinstance(target, Unstructured | SemiStructured):
        raise TypeError(f"target must be a fraction, Unstructured or SemiStructured, got {target!r}")
    handler = handler_for(method)
    if handler.calibrated and calib is None:
        raise ValueError(f"{handler.name} needs calibration token ids (calib=...): e.g. tuili.data.calibration_samples")
    handler.check(target)
    module = model.module if isinstance(model, Model) else model
    linears = select_linears(module, targets, ignore)
    if not linears:
        raise ValueError("no linear layers match the targets: nothing to prune")
    if isinstance(handler, LayerwiseHandler):
        masks = _sequential(require_tuili_model(module, handler.name), linears, target, handler, calib, progress)
    else:
        onload_all(module)  # scored over the whole model at once
        masks = target_masks(handler.scores(module, linears, calib, progress), target, per_row=False)
        for name, mask in masks.items():
            attach_mask(linears[name], mask)
    if isinstance(model, Model):
        structure = f"{target.n}:{target.m}" if isinstance(target, SemiStructured) else "unstructured"
        model.record(
            "pruned", method=handler.name, target=_describe(target), sparsity_structure=structure, layers=len(masks)
        )
    return model


def _sequential(
    module, linears: dict[str, nn.Linear], target: Target, handler: LayerwiseHandler, calib, progress: bool
) -> dict[str, Tensor]:
    outside = sorted(n for n in linears if not n.startswith("model.layers."))
    if outside:
        raise ValueError(
            f"{handler.name} calibrates decoder layers only; these targets are outside them: "
            f"{', '.join(outside)} (prune them with magnitude, or ignore them)"
        )
    runner = LayerRunner(module, calib)
    masks: dict[str, Tensor] = {}
    global_scores: dict[str, Tensor] = {}
    for i, layer in runner.layers(handler.name, progress):
        prefix = f"model.layers.{i}."
        local = {name[len(prefix) :]: m for name, m in linears.items() if name.startswith(prefix)}
        if not local:
            continue
        stats = {n: handler.statistic(m.in_features) for n, m in local.items()}
        with input_hooks(local, lambda name, x, stats=stats: stats[name].add(x)):
            runner.run(layer)
        unreached = {n: m for n, m in local.items() if not stats[n].count}  # experts no token was routed to
        by_layer = target if isinstance(target, SemiStructured) else Unstructured(target.sparsity)
        layer_masks = target_masks({n: magnitude(m.weight) for n, m in unreached.items()}, by_layer, per_row=True)
        reached = {n: m for n, m in local.items() if n not in unreached}
        more, scores = handler.prune_layer(reached, stats, target) if reached else ({}, {})
        layer_masks.update(more)
        for name, mask in layer_masks.items():
            attach_mask(local[name], mask)
            masks[prefix + name] = mask
        global_scores.update({prefix + n: s for n, s in scores.items()})
    if global_scores:  # one global threshold: all scores first, then the masks
        for name, mask in target_masks(global_scores, target, per_row=False).items():
            attach_mask(linears[name], mask)
            masks[name] = mask
    return masks


def _describe(target: Target) -> str:
    if isinstance(target, SemiStructured):
        return f"{target.n}:{target.m}"
    return f"{target.sparsity:g} unstructured ({target.scope})"
