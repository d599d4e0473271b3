"""SmoothQuant (Xiao et al., arXiv:2211.10438): divide each input channel j of a W8A8 layer's input
by s_j = max|X_j|^α / max|W_:,j|^(1−α) and multiply the weights' column j by it, so activation
outliers move into the weights, which int8 per channel absorbs better. One α for the whole model
(the paper's 0.5), or `"auto"`: per group, the α of a grid (and for static activations the clipping
of their scale) minimising the group's int8 output error on calibration rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tuili.kernels import ops as kernels
from tuili.models.layerwise import LayerRunner, input_hooks
from tuili.quant.awq import fake_quantize_weight
from tuili.quant.config import QuantScheme
from tuili.quant.gptq import gptq
from tuili.quant.methods import LayerStats, MethodHandler, register
from tuili.quant.primitives import qrange
from tuili.quant.smooth import SmoothGroup, apply_smoothing, group_scheme, smooth_targets, weight_column_max

ALPHAS = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1
ALPHA_SEARCH_ROWS = 4096  # calibration tokens, drawn from every sample, the α search looks at
PEAK_ROWS = 64  # ... plus the tokens with the largest activations, which set static scales


def smoothing_scale(act_max: Tensor, w_max: Tensor, alpha: float) -> Tensor:
    """s = max|X|^α / max|W|^(1−α), per input channel."""
    return (act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def per_token_fake_quant(x: Tensor) -> Tensor:
    """int8 round trip with one scale per row: W8A8-dynamic's activations, as Int8Linear rounds them."""
    q, scale = kernels.quantize_rows(x)
    return q.float() * scale


def static_fake_quant(x: Tensor, threshold: float) -> Tensor:
    """int8 round trip with one scale for the tensor, threshold / 127: W8A8-static's activations."""
    q, scale = kernels.quantize_rows(x, torch.tensor(max(threshold, 1e-12) / qrange(8, True)[1]))
    return q.float() * scale


@torch.no_grad()
def search_alpha(
    group: SmoothGroup, x: Tensor, act_max: Tensor, static: bool, alphas: tuple[float, ...] = ALPHAS
) -> tuple[float, Tensor]:
    """(α, s) minimising Σ ‖Q_x(x/s) · Q_w(W·s)ᵀ − x · Wᵀ‖² over the group's linears on input rows x.

    Static activations are quantized with the threshold max_j(act_max_j / s_j): the largest smoothed
    activation of the whole calibration set, as a min-max observer sees it. (Searching a clipping
    ratio of that threshold too lowers this error but raised perplexity on the default model, +2.9%
    against +2.4%: the rare tokens it clips matter more than their share of the squared error.)
    """
    x = x.float()
    weights = [m.weight.detach().float() for m in group.linears.values()]
    reference = torch.cat([x @ w.T for w in weights], dim=1)
    w_max = weight_column_max(group)
    best, best_err = (0.0, torch.ones_like(act_max)), float("inf")
    for alpha in alphas:
        s = smoothing_scale(act_max, w_max, alpha)
        wq = torch.cat([fake_quantize_weight(w * s, 8, w.shape[1], True) for w in weights]).T
        xq = static_fake_quant(x / s, float((act_max / s).max())) if static else per_token_fake_quant(x / s)
        err = (xq @ wq - reference).pow(2).mean().item()
        if err < best_err:
            best, best_err = (alpha, s), err
    return best


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant: s = max|X|^α / max|W|^(1−α) migrates activation outliers into the weights (W8A8).
    `alpha="auto"` searches α per smoothing group for the least int8 output error on calibration
    rows (for static activations it assumes min-max scales, the observer to pair it with)."""

    alpha: float | str = 0.5
    gptq: bool = False  # round the smoothed int8 weights with GPTQ instead of to nearest (llm-compressor's W8A8 recipe)
    name = "smoothquant"

    def __post_init__(self):
        if self.alpha != "auto" and (isinstance(self.alpha, str) or not 0 <= self.alpha <= 1):
            raise ValueError(f"alpha must be in [0, 1] or 'auto', got {self.alpha!r}")


@register(SmoothQuant)
class SmoothQuantHandler(MethodHandler):
    """Each layer smoothed, then its int8 weights rounded to nearest (or by GPTQ)."""

    schemes = "w8a8"
    calibrated = True

    def __init__(self, config: SmoothQuant) -> None:
        super().__init__(config)
        self.hessians = config.gptq

    def smooth(self, runner: LayerRunner, layer: nn.Module, local: dict[str, nn.Linear], schemes: dict) -> None:
        """One pass gathers each group's per-channel max |x| (and, for alpha="auto", a uniform sample
        of input rows plus the rows with the largest |x|, which set static scales); then smooth."""
        groups = smooth_targets(layer, local)
        if not groups:
            return
        alpha = self.config.alpha
        firsts = {g.first: g.linears[g.first] for g in groups}
        act_max = {n: torch.zeros(m.in_features) for n, m in firsts.items()}
        rows: dict[str, list[Tensor]] = {n: [] for n in firsts}
        peaks: dict[str, Tensor] = {}
        total = runner.hidden.shape[0] * runner.hidden.shape[1]
        generator = torch.Generator().manual_seed(0)

        def track(name, x):
            x = x.detach().float()
            act_max[name] = torch.maximum(act_max[name], x.abs().amax(0))
            if alpha == "auto":
                keep = max(1, round(x.shape[0] * ALPHA_SEARCH_ROWS / total))
                rows[name].append(x[torch.randperm(x.shape[0], generator=generator)[:keep]])
                both = x if name not in peaks else torch.cat([peaks[name], x])
                peaks[name] = both[both.abs().amax(1).topk(min(PEAK_ROWS, both.shape[0])).indices]

        with input_hooks(firsts, track):
            runner.run(layer)
        for g in groups:
            if alpha == "auto":
                static = group_scheme(g, schemes).static
                _, s = search_alpha(g, torch.cat(rows[g.first] + [peaks[g.first]]), act_max[g.first], static)
            else:
                s = smoothing_scale(act_max[g.first], weight_column_max(g), float(alpha))
            apply_smoothing(g, s)

    def quantize(self, linear: nn.Linear, scheme: QuantScheme, stats: LayerStats) -> nn.Module:
        if stats.hessian is None:
            return super().quantize(linear, scheme, stats)
        qw = gptq(linear.weight.detach().float(), stats.hessian.value(), 8, linear.in_features, True, act_order=True)
        return scheme.from_quantized(qw, linear.bias, stats.input_scale())
