"""Observers: watch activations during calibration, then choose the clipping threshold t of a
symmetric int8 scale s = t / 127. The choices users know from PyTorch and TensorRT."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tuili.quant.primitives import check_finite, qrange

NUM_BINS = 2048


class MinMax:
    """t = the largest |x| ever seen."""

    def __init__(self):
        self.max_abs = 0.0

    def observe(self, x: Tensor) -> None:
        check_finite(x, "activation")
        self.max_abs = max(self.max_abs, x.detach().abs().max().item())

    def threshold(self) -> float:
        return self.max_abs

    def scale(self, bits: int = 8) -> Tensor:
        """Symmetric scale t / (2^(bits−1) − 1); an observer that saw only zeros gives scale 1."""
        t = self.threshold()
        return torch.tensor(t / qrange(bits, True)[1] if t > 0 else 1.0)


class MovingAverageMinMax(MinMax):
    """t = exponential moving average of each batch's max |x| (robust to one extreme batch)."""

    def __init__(self, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.average: float | None = None

    def observe(self, x: Tensor) -> None:
        check_finite(x, "activation")
        batch_max = x.detach().abs().max().item()
        self.average = (
            batch_max if self.average is None else ((1 - self.momentum) * self.average + self.momentum * batch_max)
        )

    def threshold(self) -> float:
        return self.average or 0.0


class Histogram(MinMax):
    """A histogram of |x| over [0, max seen], re-binned when the range grows; base of the
    percentile, MSE and entropy observers."""

    def __init__(self):
        super().__init__()
        self.hist = torch.zeros(NUM_BINS, dtype=torch.float64)

    def observe(self, x: Tensor) -> None:
        x = x.detach().abs().float().flatten()
        old_max = self.max_abs
        super().observe(x)
        if self.max_abs > old_max and old_max > 0:  # stretch the old counts onto the wider range
            centers = (torch.arange(NUM_BINS, dtype=torch.float64) + 0.5) * old_max / NUM_BINS
            index = (centers / self.max_abs * NUM_BINS).long().clamp(max=NUM_BINS - 1)
            self.hist = torch.zeros(NUM_BINS, dtype=torch.float64).index_add_(0, index, self.hist)
        if self.max_abs > 0:
            self.hist += torch.histc(x, NUM_BINS, 0, self.max_abs).double()

    @property
    def centers(self) -> Tensor:
        return (torch.arange(NUM_BINS, dtype=torch.float64) + 0.5) * self.max_abs / NUM_BINS


class Percentile(Histogram):
    """t = the given percentile of |x| (clips the rarest outliers)."""

    def __init__(self, percentile: float = 99.99):
        super().__init__()
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def threshold(self) -> float:
        if self.max_abs == 0:
            return 0.0
        cdf = self.hist.cumsum(0) / self.hist.sum()
        index = int(torch.searchsorted(cdf, self.percentile / 100))
        return min(index + 1, NUM_BINS) * self.max_abs / NUM_BINS


class MSE(Histogram):
    """t minimising the expected squared error (clipping + rounding) over the observed histogram."""

    def threshold(self) -> float:
        if self.max_abs == 0:
            return 0.0
        qmax = qrange(8, True)[1]
        candidates = torch.linspace(0.05, 1.0, 96, dtype=torch.float64) * self.max_abs
        centers = self.centers
        errors = []
        for t in candidates:
            s = t / qmax
            approx = (centers / s).round().clamp(-qmax, qmax) * s
            errors.append(float((self.hist * (centers - approx) ** 2).sum()))
        return float(candidates[int(torch.tensor(errors).argmin())])


class Entropy(Histogram):
    """TensorRT's entropy calibration: t minimising KL(P ‖ Q) between the clipped histogram P and
    its 128-level quantized version Q."""

    def threshold(self) -> float:
        if self.max_abs == 0:
            return 0.0
        levels = 128
        best, best_kl = NUM_BINS, math.inf
        for i in range(levels, NUM_BINS + 1, 16):
            p = self.hist[:i].clone()
            p[-1] += self.hist[i:].sum()  # clipped mass lands in the last bin
            q = _spread(self.hist[:i], levels)
            kl = _kl(p, q)
            if kl < best_kl:
                best, best_kl = i, kl
        return best * self.max_abs / NUM_BINS


def _spread(hist: Tensor, levels: int) -> Tensor:
    """Merge `hist` into `levels` bins, then spread each level's mass evenly over its non-empty bins."""
    n = hist.numel()
    edges = torch.linspace(0, n, levels + 1).long()
    q = torch.zeros_like(hist)
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
        chunk = hist[a:b]
        nonzero = chunk > 0
        if nonzero.any():
            q[a:b][nonzero] = chunk.sum() / nonzero.sum()
    return q


def _kl(p: Tensor, q: Tensor) -> float:
    p, q = p / p.sum(), q / q.sum().clamp(min=1e-30)
    mask = p > 0
    q = q[mask].clamp(min=1e-12)
    return float((p[mask] * (p[mask] / q).log()).sum())


OBSERVERS = {
    "minmax": MinMax,
    "moving-average": MovingAverageMinMax,
    "percentile": Percentile,
    "mse": MSE,
    "entropy": Entropy,
}


def make_observer(name: str) -> MinMax:
    if name not in OBSERVERS:
        raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {name!r}")
    return OBSERVERS[name]()
