"""AWQ (Lin et al., arXiv:2306.00978): protect the weights that meet large activations by scaling
input channels by s = mean|x|^α before quantization (folded into the previous op), α searched on
calibration inputs; then search a clipping ratio per weight group."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tuili.quant.primitives import fake_quantize, qparams, quantize_weight, split_groups
from tuili.quant.smooth import SmoothGroup


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
