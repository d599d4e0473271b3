"""Embeddings and log-likelihood scoring: a padded batch gives each sequence what it gets alone."""

import pytest
import torch
from helpers import random_tiny

from tuili.engine.pooling import embed, loglikelihood


@pytest.fixture(scope="module")
def model():
    return random_tiny("llama-gqa")


def test_embeddings_are_unit_mean_pooled_final_hidden_states(model):
    ids = [5, 9, 100, 7]
    (vector,) = embed(model, [ids])
    with torch.no_grad():
        hidden = model.module.final_hidden(torch.tensor([ids]))[0]
    expected = hidden.mean(0) / hidden.mean(0).norm()
    torch.testing.assert_close(vector, expected, atol=1e-6, rtol=1e-5)


def test_a_ragged_batch_equals_each_sequence_alone(model):
    sequences = [[5, 9, 100, 7], list(range(20, 53)), [200]]
    batched = embed(model, sequences)
    for row, seq in zip(batched, sequences):
        torch.testing.assert_close(row, embed(model, [seq])[0], atol=1e-5, rtol=1e-5)


def test_loglikelihood_sums_the_continuations_token_log_probabilities(model):
    context, continuation = [5, 9, 100], [7, 3, 250]
    (score,) = loglikelihood(model, [(context, continuation)], top_logprobs=2)
    with torch.no_grad():
        logp = torch.log_softmax(model.module(torch.tensor([context + continuation])).logits[0], -1)
    expected = [float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation)]
    assert score.token_logprobs == pytest.approx(expected, abs=1e-5)
    assert score.logprob == pytest.approx(sum(expected), abs=1e-5)
    greedy = [int(logp[len(context) - 1 + i].argmax()) for i in range(len(continuation))]
    assert score.is_greedy == (greedy == continuation)
    assert [top[0][0] for top in score.top_logprobs] == greedy


def test_the_greedy_continuation_is_greedy(model):
    context = [11, 12, 13]
    with torch.no_grad():
        seq = list(context)
        for _ in range(3):
            seq.append(int(model.module(torch.tensor([seq])).logits[0, -1].argmax()))
    (score,) = loglikelihood(model, [(context, seq[3:])])
    assert score.is_greedy


def test_batched_scores_equal_scores_alone(model):
    pairs = [([1, 2, 3], [4, 5]), (list(range(30, 60)), [7]), ([9], [8, 7, 6, 5])]
    batched = loglikelihood(model, pairs)
    for pair, score in zip(pairs, batched):
        assert score.logprob == pytest.approx(loglikelihood(model, [pair])[0].logprob, abs=1e-4)


def test_empty_inputs_are_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        embed(model, [[1], []])
    with pytest.raises(ValueError, match="context has no tokens"):
        loglikelihood(model, [([], [1])])
    with pytest.raises(ValueError, match="continuation has no tokens"):
        loglikelihood(model, [([1], [])])
