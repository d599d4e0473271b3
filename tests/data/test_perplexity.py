import math
from types import SimpleNamespace

import torch
from torch import nn

from tuili.data import perplexity


class Fixed(nn.Module):
    """A stand-in model whose logits are a fixed function of the input ids."""

    def __init__(self, logits_of):
        super().__init__()
        self.logits_of = logits_of
        self.p = nn.Parameter(torch.zeros(1))  # perplexity() reads the device from a parameter

    def forward(self, ids):
        return SimpleNamespace(logits=self.logits_of(ids))


def uniform(vocab: int) -> Fixed:
    """Every token has probability 1/V: perplexity must be exactly V."""
    return Fixed(lambda ids: torch.zeros(*ids.shape, vocab))


def oracle(vocab: int) -> Fixed:
    """Knows the next token of a counting sequence with probability ~1: perplexity ~1."""
    return Fixed(lambda ids: torch.nn.functional.one_hot((ids + 1) % vocab, vocab).float() * 50)


def test_uniform_model_has_perplexity_vocab_size():
    windows = torch.randint(0, 50, (4, 16))
    result = perplexity(uniform(50), windows, progress=False)
    assert math.isclose(result.perplexity, 50, rel_tol=1e-5)
    assert result.num_tokens == 4 * 15 and result.num_windows == 4


def test_perfect_predictor_has_perplexity_one_and_batching_does_not_matter():
    windows = torch.arange(64).view(4, 16) % 50
    one = perplexity(oracle(50), windows, batch_size=1, progress=False)
    four = perplexity(oracle(50), windows, batch_size=4, progress=False)
    assert one.perplexity < 1.0001
    assert math.isclose(one.nll, four.nll, abs_tol=1e-9)


def test_real_model_perplexity_equals_direct_cross_entropy():
    from helpers import random_tiny

    model = random_tiny()
    windows = torch.randint(0, 259, (3, 20), generator=torch.Generator().manual_seed(0))
    logits = model.module(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 259), windows[:, 1:].reshape(-1))
    assert math.isclose(
        perplexity(model.module, windows, progress=False).perplexity, math.exp(nll.item()), rel_tol=1e-5
    )
