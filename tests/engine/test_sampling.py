import pytest
import torch

from tuili.engine import SamplingParams, sample


def draws(logits, params, n=2000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([sample(logits, params, gen) for _ in range(n)])


LOGITS = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0)).tolist() == [0]


def test_top_k_only_draws_the_k_most_likely():
    assert set(draws(LOGITS, SamplingParams(top_k=2)).flatten().tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_nucleus():
    probs = LOGITS.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert set(draws(LOGITS, SamplingParams(top_p=0.8)).flatten().tolist()) == {0, 1}
    assert set(draws(LOGITS, SamplingParams(top_p=0.5)).flatten().tolist()) == {0}


def test_temperature_one_follows_the_softmax():
    counts = torch.bincount(draws(LOGITS, SamplingParams(), n=4000).flatten(), minlength=5).float() / 4000
    torch.testing.assert_close(counts, LOGITS.softmax(-1)[0], atol=0.03, rtol=0)


def test_low_temperature_sharpens():
    hot = draws(LOGITS, SamplingParams(temperature=2.0))
    cold = draws(LOGITS, SamplingParams(temperature=0.2))
    assert (cold == 0).float().mean() > (hot == 0).float().mean()


def test_same_seed_same_draws():
    assert torch.equal(draws(LOGITS, SamplingParams(), seed=3), draws(LOGITS, SamplingParams(), seed=3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_min_p_drops_tokens_below_a_share_of_the_best():
    probs = torch.softmax(LOGITS[0], -1)
    params = SamplingParams(min_p=float(probs[2] / probs[0]) + 1e-3)  # keeps tokens 0 and 1 only
    assert set(draws(LOGITS, params).flatten().tolist()) == {0, 1}


def test_penalties_follow_vllm_and_openai():
    from tuili.engine.sampling import apply_penalties

    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), [[0]], [[1]])
    assert rep.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # seen: positive logits shrink, negative grow
    freq = apply_penalties(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [[3]], [[2, 2, 0]])
    assert freq.tolist() == [[2.0 - 0.5 - 0.25, -2.0, 1.0 - 1.0 - 0.25, 0.5]]  # the prompt's token 3 is exempt


def test_logprobs_of_the_chosen_token_and_the_top_alternatives():
    from tuili.engine.sampling import token_logprobs

    [entry] = token_logprobs(LOGITS, torch.tensor([1]), 2)
    expected = torch.log_softmax(LOGITS[0], -1)
    assert entry.token_id == 1 and entry.rank == 2  # the second most likely
    assert entry.logprob == pytest.approx(float(expected[1]))
    assert [t for t, _ in entry.top] == [0, 1] and entry.top[0][1] == pytest.approx(float(expected[0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_bad_new_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


EXTREME = [
    {"temperature": 1e-30},
    {"temperature": 1.1e-5},
    {"temperature": 1e-5, "top_p": 5e-324},
    {"top_p": 5e-324},
    {"min_p": 1.0},
    {"top_k": 10**30},
    {"top_k": 1, "temperature": 2.0},
    {"repetition_penalty": 1e-300},
    {"repetition_penalty": 1e300},
    {"min_p": 1.0, "top_p": 1e-9, "top_k": 1},
]
ROWS = {
    "ordinary": LOGITS,
    "huge": torch.tensor([[3e38, -3e38, 1e30, 0.0, -1.0]]),
    "with inf and nan": torch.tensor([[float("inf"), float("nan"), 1.0, float("-inf"), 0.0]]),
    "all -inf": torch.full((1, 5), float("-inf")),
    "all nan": torch.full((1, 5), float("nan")),
}


@pytest.mark.parametrize("kwargs", EXTREME)
@pytest.mark.parametrize("row", list(ROWS))
def test_extreme_but_valid_parameters_always_give_a_token(kwargs, row):
    """No NaN draw, no error: the sampler returns a token in the vocabulary for every accepted value."""
    from tuili.engine.sampling import apply_penalties, token_logprobs

    params = SamplingParams(**kwargs)
    logits = apply_penalties(ROWS[row], params, [[0, 1, 2]], [[3]]) if params.penalized else ROWS[row]
    for seed in range(20):
        token = sample(logits, params, torch.Generator().manual_seed(seed))
        assert token.shape == (1,) and 0 <= int(token) < 5
    _, value, top, _ = token_logprobs(logits, token, 5)[0]
    assert -1e4 <= value <= 0 and all(-1e4 <= lp <= 0 for _, lp in top)  # finite: JSON has no -inf


def test_degenerate_rows_take_their_most_likely_token():
    assert sample(ROWS["with inf and nan"], SamplingParams(temperature=1.0)).tolist() == [0]
    assert sample(torch.tensor([[0.0, 5.0, 1.0]]), SamplingParams(temperature=1e-6)).tolist() == [1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": float("nan")}, "finite"),
        ({"repetition_penalty": float("inf")}, "finite"),
        ({"seed": 1 << 63}, "64-bit"),
        ({"seed": -(1 << 63) - 1}, "64-bit"),
    ],
)
def test_non_finite_values_and_seeds_out_of_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0


def test_logit_bias_forces_and_forbids_tokens():
    from helpers import random_tiny

    from tuili.engine import LLM

    llm = LLM(random_tiny("llama-gqa"))
    free = llm.generate(["abc"], SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    forced = llm.generate(["abc"], SamplingParams(max_tokens=6, temperature=0, logit_bias={77: 100.0}))[0]
    assert forced.token_ids == [77] * 6
    avoid = {t: -100.0 for t in set(free)}
    sampled = llm.generate(["abc"], SamplingParams(max_tokens=6, temperature=1.0, seed=0, logit_bias=avoid))[0]
    assert not set(sampled.token_ids) & set(free)


@pytest.mark.parametrize("bias", [{-1: 1.0}, {5: 101.0}, {5: float("nan")}])
def test_logit_bias_out_of_range_is_refused(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_draw_follows_each_rows_distribution_and_never_picks_a_zero():
    from tuili.engine.sampling import draw

    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.1, 0.0, 0.9, 0.0, 0.0]])
    counts = torch.zeros(2, 5)
    for _ in range(4000):
        counts[torch.arange(2), draw(probs, gen)] += 1
    torch.testing.assert_close(counts / 4000, probs, atol=0.03, rtol=0)
    assert counts[probs == 0].sum() == 0
    unnormalised = torch.tensor([[2.0, 0.0, 6.0]])  # masked rows need not sum to one
    share = sum(int(draw(unnormalised, gen)) == 2 for _ in range(2000)) / 2000
    assert abs(share - 0.75) < 0.04
