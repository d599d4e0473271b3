"""Perplexity over token windows: exp(mean negative log-likelihood of each next token).

It sits in `data` (above quant, prune and distill in the one-way flow) so that every compression
step can score what it produced with the same harness.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from tuili.models.layerwise import LayerRunner
from tuili.models.lazy import on_disk


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    num_tokens: int  # tokens scored: (seq_len − 1) per window
    num_windows: int
    seq_len: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Tokens run through the model per second (all of each window, scored or not)."""
        return self.num_windows * self.seq_len / self.seconds if self.seconds else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def window_nll(logits: Tensor, window: Tensor) -> Tensor:
    """Summed next-token NLL of each row, (B,); cross-entropy in fp32 whatever the model's dtype."""
    logits = logits[:, :-1].float()
    targets = window[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return loss.view(targets.shape).sum(dim=1)


@torch.no_grad()  # not inference_mode: tensor-subclass layers (quanto, torchao) refuse it
def perplexity(module: nn.Module, windows: Tensor, batch_size: int = 1, progress: bool = True) -> Perplexity:
    """Score each window independently (no context carried across windows), as lm-eval-harness does
    for rolling perplexity without overlap. `module(ids)` must return an object with `.logits`."""
    if on_disk(module):  # a lazy model: one decoder layer read at a time, put back after
        return _layer_by_layer(module, windows, progress)
    device = next(module.parameters()).device
    total, start = 0.0, time.perf_counter()
    batches = windows.split(batch_size)
    for batch in tqdm(
        batches, desc="perplexity", unit="window", unit_scale=batch_size, disable=not progress, leave=False
    ):
        batch = batch.to(device)
        total += window_nll(module(batch).logits, batch).sum().item()
    num_tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = total / num_tokens
    return Perplexity(math.exp(nll), nll, num_tokens, windows.shape[0], windows.shape[1], time.perf_counter() - start)


@torch.no_grad()
def _layer_by_layer(module: nn.Module, windows: Tensor, progress: bool) -> Perplexity:
    """Perplexity of a lazily loaded model, every window through one decoder layer at a time: the
    layers still on disk are read, run and dropped again, so scoring the float model before
    compressing it holds one float layer, not the whole checkpoint."""
    start = time.perf_counter()
    runner = LayerRunner(module, windows)  # type: ignore[arg-type]
    for _ in runner.layers("perplexity", progress, put_back=True):
        pass  # each layer only runs
    total = 0.0
    for hidden, window in zip(runner.hidden.split(1), windows.split(1)):  # the head one window at a time
        logits = module.logits(module.model.norm(hidden))  # type: ignore[operator,union-attr]
        total += window_nll(logits, window.to(logits.device)).sum().item()
    n, t = windows.shape
    nll = total / (n * (t - 1))
    return Perplexity(math.exp(nll), nll, n * (t - 1), n, t, time.perf_counter() - start)
