"""Forward passes that are not generation: sentence embeddings and log-likelihood scoring.

Both run a batch of ragged sequences as one right-padded (B, T) forward without a cache. The model
is causal, so the padding after a sequence never reaches its own positions: each row's results
equal those of the sequence run alone (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tuili.models.model import Model


@dataclass
class Score:
    """log P(continuation | context), summed over the continuation's tokens."""

    logprob: float
    token_logprobs: list[float]
    is_greedy: bool  # every continuation token was the most likely one
    top_logprobs: list[list[tuple[int, float]]]  # per continuation token, with top_logprobs=n
    ranks: list[int] | None = None  # per continuation token: 1 where it was the most likely


def _padded(sequences: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """(B, T) ids right-padded with `pad`, and the lengths (B,)."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, lengths


@torch.no_grad()
def embed(model: Model, sequences: list[list[int]]) -> Tensor:
    """(B, hidden) float32 embeddings: the final (normed) hidden states averaged over each
    sequence's tokens, scaled to unit L2 norm so that a dot product is the cosine similarity."""
    if not sequences or any(not s for s in sequences):
        raise ValueError("every input to embed needs at least one token")
    module = model.module
    ids, lengths = _padded(sequences)
    device = module.device
    last = module.final_hidden(ids.to(device)).float()  # (B, T, H)
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).to(device=device, dtype=last.dtype)
    pooled = (last * mask[..., None]).sum(1) / lengths.to(device=device, dtype=last.dtype)[:, None]
    return F.normalize(pooled, dim=-1).cpu()


@torch.no_grad()
def loglikelihood(model: Model, pairs: list[tuple[list[int], list[int]]], top_logprobs: int = 0) -> list[Score]:
    """Score each (context ids, continuation ids): the log-probability the model gives the
    continuation after the context, per token and summed, and whether greedy decoding would
    produce it. The context may be empty only if the tokenizer adds a BOS token (there must be a
    token to predict the first continuation token from)."""
    sequences = []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("the continuation has no tokens")
        if not context:
            raise ValueError("the context has no tokens: the first continuation token has nothing to follow")
        sequences.append(context + continuation)
    module = model.module
    ids, _ = _padded(sequences)
    logits = module(ids.to(module.device)).logits.float()  # (B, T, V)
    scores = []
    for row, (context, continuation) in enumerate(pairs):
        start = len(context) - 1  # the logits at position p predict token p + 1
        logp = torch.log_softmax(logits[row, start : start + len(continuation)], dim=-1)
        target = torch.tensor(continuation, device=logp.device)
        chosen = logp.gather(-1, target[:, None])[:, 0]
        greedy = bool((logp.argmax(-1) == target).all())
        top = []
        if top_logprobs:
            values, indices = logp.topk(top_logprobs, dim=-1)
            top = [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
        ranks = ((logp > chosen[:, None]).sum(-1) + 1).tolist()
        scores.append(Score(float(chosen.sum()), chosen.tolist(), greedy, top, ranks))
    return scores
