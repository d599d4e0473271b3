"""AWQ (Lin et al., arXiv:2306.00978): protect the weights that meet large activations by scaling
input channels by s = mean|x|^α before quantization (folded into the previous op), α searched on
calibration inputs; then search a clipping ratio per weight group."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tuili.models.layerwise import LayerRunner, first_rows
from tuili.quant.config import QuantScheme
from tuili.quant.methods import MAX_SAMPLE_ROWS, LayerStats, MethodHandler, register
from tuili.quant.primitives import fake_quantize, qparams, quantize_weight, split_groups
from tuili.quant.smooth import SmoothGroup, apply_smoothing, group_scheme, smooth_targets


def fake_quantize_weight(w: Tensor, bits: int, group_size: int, symmetric: bool, clip: Tensor | None = None) -> Tensor:
    """Round-to-nearest in groups, as float; `clip` (out, num_groups) shrinks each group's range."""
    return quantize_weight(w, bits, group_size, symmetric, clip).dequantize()


@torch.no_grad()
def search_scale(group: SmoothGroup, x: Tensor, bits: int, group_size: int, symmetric: bool, grid: int = 20) -> Tensor:
    """The s = mean|x|^α (α on a grid in [0, 1)) minimising ‖Q(W·s)(x/s) − W x‖² over the group."""
    x = x.float()
    linears = list(group.linears.values())
    reference = torch.cat([x @ m.weight.float().T for m in linears], dim=1)
    x_mean = x.abs().mean(dim=0)
    best_s, best_err = torch.ones_like(x_mean), float("inf")
    for alpha in torch.arange(grid) / grid:
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out = torch.cat(
            [(x / s) @ fake_quantize_weight(m.weight.float() * s, bits, group_size, symmetric).T for m in linears],
            dim=1,
        )
        err = (out - reference).pow(2).mean().item()
        if err < best_err:
            best_s, best_err = s, err
    return best_s


@torch.no_grad()
def search_clip(
    linear: nn.Linear, x: Tensor, bits: int, group_size: int, symmetric: bool, ratios: int = 10, min_ratio: float = 0.5
) -> Tensor:
    """Per (row, group) range shrink factor in [min_ratio, 1] minimising that group's output error."""
    w = split_groups(linear.weight.float(), group_size)  # (out, G, g)
    xg = split_groups(x.float(), group_size)  # (n, G, g)
    reference = torch.einsum("ogk,ngk->ogn", w, xg)
    lo, hi = w.amin(-1), w.amax(-1)
    best = torch.ones(w.shape[:2])
    best_err = torch.full(w.shape[:2], float("inf"))
    for ratio in torch.linspace(1.0, min_ratio, ratios):
        scale, zero = qparams(lo * ratio, hi * ratio, bits, symmetric)
        wq = fake_quantize(w, scale[..., None], zero[..., None], bits, symmetric)
        err = (torch.einsum("ogk,ngk->ogn", wq, xg) - reference).pow(2).mean(-1)
        better = err < best_err
        best[better], best_err[better] = ratio, err[better]
    return best


@dataclass(frozen=True)
class AWQ:
    """AWQ: activation-aware channel scales searched on a grid of `grid` exponents, then clipping."""

    grid: int = 20
    clip: bool = True
    name = "awq"


@register(AWQ)
class AWQHandler(MethodHandler):
    """Each layer's channels scaled by a searched power of their mean |x|, then each weight group's
    range clipped where that lowers the output error."""

    schemes = "weight-only"
    calibrated = True

    def __init__(self, config: AWQ) -> None:
        super().__init__(config)
        self.samples = config.clip

    def smooth(self, runner: LayerRunner, layer: nn.Module, local: dict[str, nn.Linear], schemes: dict) -> None:
        groups = smooth_targets(layer, local)
        if not groups:
            return
        samples = first_rows(runner, layer, {g.first: g.linears[g.first] for g in groups}, MAX_SAMPLE_ROWS)
        for g in groups:
            bits, group_size, symmetric = group_scheme(g, schemes).weight_groups(g.linears[g.first].in_features)
            apply_smoothing(g, search_scale(g, samples[g.first], bits, group_size, symmetric, self.config.grid))

    def quantize(self, linear: nn.Linear, scheme: QuantScheme, stats: LayerStats) -> nn.Module:
        if stats.samples is None:
            return super().quantize(linear, scheme, stats)
        bits, group_size, symmetric = scheme.weight_groups(linear.in_features)
        clip = search_clip(linear, stats.samples, bits, group_size, symmetric)
        qw = quantize_weight(linear.weight.detach().float(), bits, group_size, symmetric, clip)
        return scheme.from_quantized(qw, linear.bias)
