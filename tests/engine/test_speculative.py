"""Speculative decoding is exact: greedy output is plain decoding's token for token (prompt lookup
and a draft model, across preemptions, stop strings and the prefix cache), sampled output follows
the model's distribution (rejection sampling, checked against the exact probabilities), and the
KV of every rejected draft is rolled back and its blocks freed."""

import pytest
import torch
from helpers import random_tiny

from tuili.engine import LLM, LLMEngine, SamplingParams
from tuili.engine.speculative import Draft, SpeculativeConfig, verify

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
# repeating prompts give prompt lookup something to find; the random models repeat themselves too
PROMPTS = [list(range(3, 40)) * 2, list(range(50, 70)), [5, 6, 7], [9, 8, 7, 9, 8, 7, 9, 8]]


@pytest.fixture(scope="module")
def model():
    return random_tiny("llama-gqa", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def other(model):
    """A draft that guesses badly: another random model of the same vocabulary."""
    return random_tiny("llama-gqa", seed=3, max_position_embeddings=1024)


def configs(model, other) -> dict[str, SpeculativeConfig]:
    return {
        "ngram": SpeculativeConfig(num_speculative_tokens=5),
        "same model": SpeculativeConfig(method="draft", draft_model=model, num_speculative_tokens=4),
        "other model": SpeculativeConfig(method="draft", draft_model=other, num_speculative_tokens=6),
    }


@pytest.mark.parametrize("name", ["ngram", "same model", "other model"])
def test_greedy_output_is_plain_decodings(model, other, name):
    plain = LLM(model, block_size=4).generate(PROMPTS, GREEDY)
    llm = LLM(model, block_size=4, speculative=configs(model, other)[name])
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == [o.token_ids for o in plain]
    speculator = llm.engine.speculator
    assert speculator.steps > 0
    if name == "same model":
        assert speculator.acceptance_rate == 1.0
    if name == "other model":
        assert speculator.acceptance_rate < 0.5


@pytest.mark.parametrize("name", ["ngram", "other model"])
def test_greedy_output_holds_across_preemptions(model, other, name):
    per_token = LLM(model).engine.cache.bytes_per_token(model.config)
    plain = LLM(model, block_size=4).generate(PROMPTS, GREEDY)
    tight = LLM(model, block_size=4, kv_cache_bytes=40 * 4 * per_token, speculative=configs(model, other)[name])
    outs = tight.generate(PROMPTS, GREEDY)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert tight.engine.cache.allocator.num_free + tight.engine.scheduler.prefix.num_evictable() == 40


def test_stop_strings_eos_and_max_tokens_inside_accepted_drafts(model, other):
    text = LLM(model).generate([PROMPTS[0]], GREEDY)[0].outputs[0].text
    params = [
        SamplingParams(max_tokens=13, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0, stop=[text[9:12]]),
        SamplingParams(max_tokens=40, temperature=0, logprobs=2, ignore_eos=True),
    ]
    for p in params:
        plain = LLM(model).generate(PROMPTS, p)
        spec = LLM(model, speculative=configs(model, other)["same model"]).generate(PROMPTS, p)
        for a, b in zip(plain, spec):
            assert (a.outputs[0].text, a.outputs[0].finish_reason) == (b.outputs[0].text, b.outputs[0].finish_reason)
            for x, y in zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or []):
                assert x.keys() == y.keys()
                assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_rejected_drafts_free_their_blocks_and_stay_out_of_the_prefix_cache(model, other):
    spec = SpeculativeConfig(method="draft", draft_model=other, num_speculative_tokens=12)
    engine = LLMEngine(model, block_size=4, speculative=spec)
    request_id = engine.add_request(PROMPTS[1], GREEDY)
    request = engine.requests[request_id]
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens = out.token_ids
        if request.table is not None and request.num_computed > len(request.prompt_ids):
            # 12 drafts took 3 more blocks for the step; the rejected ones' are back in the free list
            assert request.table.num_tokens == request.num_computed
            assert len(request.table.blocks) == -(-request.num_computed // 4)
    assert engine.speculator.proposed - engine.speculator.accepted > 24
    # a prompt that continues the finished text reads its blocks from the prefix cache: they must
    # hold the accepted tokens, not rejected drafts
    follow = PROMPTS[1] + tokens
    again = LLM(model, block_size=4)
    again.engine = engine
    cached = again.generate([follow], GREEDY)[0]
    assert cached.num_cached_tokens > len(PROMPTS[1])
    assert cached.outputs[0].token_ids == LLM(model, block_size=4).generate([follow], GREEDY)[0].outputs[0].token_ids


def test_requests_that_cannot_speculate_decode_plainly_beside_those_that_do(model):
    penalized = SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3, ignore_eos=True)
    llm = LLM(model, speculative=SpeculativeConfig(max_batch=2))
    outs = llm.generate(PROMPTS[:2], [GREEDY, penalized])
    plain = LLM(model).generate(PROMPTS[:2], [GREEDY, penalized])
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    busy = LLM(model, speculative=SpeculativeConfig(max_batch=2))
    busy.generate(PROMPTS, GREEDY)  # four decoding at once: more than max_batch
    assert busy.engine.speculator.steps < llm.engine.speculator.steps + 40


@pytest.mark.parametrize("with_q", [False, True])
def test_rejection_sampling_gives_the_models_distribution(with_q):
    """The first two tokens a check yields, over many draws, against the exact probabilities:
    P(t1) = p1, and P(t2 | t1 = d1) = p2 (the second position is reached only through d1)."""
    torch.manual_seed(0)
    vocab, n = 6, 40_000
    logits = torch.randn(3, vocab) * 1.5
    params = SamplingParams(temperature=0.9, top_k=5)
    from tuili.engine.sampling import probabilities

    p = probabilities(logits, params)
    q = torch.softmax(torch.randn(2, vocab), dim=-1) if with_q else None
    generator = torch.Generator().manual_seed(1)
    firsts, seconds = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(2)] if with_q else [2, 4]
        drafts[0] = drafts[0] if with_q else 2
        tokens = verify(logits, Draft(drafts, q), params, generator)
        firsts[tokens[0]] += 1
        if tokens[0] == drafts[0] and len(tokens) > 1 and (not with_q or drafts[0] == 2):
            seconds[tokens[1]] += 1
    assert (firsts / n - p[0]).abs().max() < 0.01
    assert (seconds / seconds.sum() - p[1]).abs().max() < 0.015
    assert firsts[p[0] == 0].sum() == 0  # a token top-k removed is never produced


def test_greedy_check_keeps_drafts_up_to_the_first_disagreement():
    logits = torch.full((4, 5), -1.0)
    for row, best in enumerate([3, 1, 4, 0]):
        logits[row, best] = 1.0
    params = SamplingParams(temperature=0)
    assert verify(logits, Draft([3, 1, 4]), params, torch.Generator()) == [3, 1, 4, 0]
    assert verify(logits, Draft([3, 2, 4]), params, torch.Generator()) == [3, 1]
    assert verify(logits, Draft([0, 1, 4]), params, torch.Generator()) == [3]


@pytest.mark.parametrize(
    "options, words",
    [
        ({"method": "medusa"}, "draft, ngram"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"method": "draft"}, "draft model"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_bad_settings_say_what_is_wrong(options, words):
    with pytest.raises(ValueError, match=words):
        SpeculativeConfig(**options)


def test_a_draft_of_another_vocabulary_is_refused(model):
    small = random_tiny("llama-gqa", vocab_size=200)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(model, speculative=SpeculativeConfig(method="draft", draft_model=small))
