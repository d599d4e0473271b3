"""The engine: continuous batching, chunked prefill, preemption, cancellation and prefix reuse all
give exactly the tokens a plain recomputation gives."""

import pytest
import torch
from helpers import random_tiny

from tuili.engine import LLM, LLMEngine, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[5, 9, 100, 7, 3], list(range(20, 53)), [200, 201], list(range(60, 79))]


@pytest.fixture(scope="module")
def model():
    return random_tiny("llama-gqa")


@torch.no_grad()
def reference_greedy(module, prompt, n):
    """Greedy tokens by recomputing the whole sequence at every step: no cache, no batching."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(module(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def run_to_end(engine):
    """Step until every request finished; returns request id -> final output and the step count."""
    done, steps = {}, 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done, steps


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-sliding", "llama-mqa-tied"])
@pytest.mark.parametrize("budget", [512, 7])  # 7 tokens per step: every prompt is prefilled in chunks
def test_batched_greedy_equals_recomputation(arch, budget):
    model = random_tiny(arch)
    llm = LLM(model, max_num_batched_tokens=budget, block_size=4)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == reference_greedy(model.module, prompt, 12)
        assert out.finish_reason == "length"


def test_a_long_prompt_is_chunked_while_others_keep_decoding(model):
    engine = LLMEngine(model, max_num_batched_tokens=8, block_size=4)
    engine.add_request([1, 2, 3], GREEDY)
    engine.step()  # the short request is prefilled and decoding
    engine.add_request(list(range(30, 70)), GREEDY)  # 40 tokens: 6 steps of 7 at most
    for _ in range(5):
        outs = engine.step()
        assert [o.request_id for o in outs] == ["req-0"]  # the long one is still prefilling
    outs = engine.step()
    assert {o.request_id for o in outs} == {"req-0", "req-1"}  # its prompt is done: first token


def test_a_request_joins_the_running_batch_between_steps(model):
    engine = LLMEngine(model, block_size=4)
    engine.add_request([1, 2, 3], GREEDY)
    engine.step()
    engine.step()
    engine.add_request([4, 5, 6, 7], GREEDY)
    outs = engine.step()
    assert {o.request_id for o in outs} == {"req-0", "req-1"}
    assert engine.stats()["running"] == 2


def test_preemption_and_resume_give_the_uninterrupted_text(model):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    roomy = LLM(model, block_size=4).generate(PROMPTS, params)
    tight = LLM(model, block_size=4, kv_cache_bytes=18 * 4 * _bytes_per_token(model), prefix_caching=False)
    outs = tight.generate(PROMPTS, params)  # 18 blocks of 4 tokens: the four cannot all fit at once
    assert tight.engine.stats()["preemptions"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.engine.cache.allocator.num_free == 18


def test_seeded_sampling_is_reproducible_within_and_across_batches(model):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    llm = LLM(model)
    together = llm.generate([[1, 2, 3]] * 3 + [[9, 9]], params)
    alone = llm.generate([[1, 2, 3]], params)[0]
    assert together[0].token_ids == together[1].token_ids == together[2].token_ids == alone.token_ids
    other = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True))
    assert other[0].token_ids != alone.token_ids


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_cancelling_frees_every_block(model, prefix_caching):
    engine = LLMEngine(model, block_size=4, prefix_caching=prefix_caching)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.step()
    engine.step()
    for request_id in ids:
        out = engine.abort(request_id)
        assert out.finished and out.finish_reason == "abort"
    assert not engine.has_unfinished() and engine.abort(ids[0]) is None
    allocator, prefix = engine.cache.allocator, engine.scheduler.prefix
    if prefix is not None:  # what the prefix index still holds is free to evict, and only that
        prefix.evict(allocator.num_blocks)
    assert allocator.num_free == allocator.num_blocks


def test_a_repeated_prompt_reuses_the_cached_prefix(model):
    llm = LLM(model, block_size=4)
    system = list(range(100, 140))
    first = llm.generate([system + [1]], GREEDY)[0]
    second = llm.generate([system + [2]], GREEDY)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 40
    assert second.token_ids == reference_greedy(model.module, system + [2], 12)
    assert llm.engine.stats()["prefix_cache_hits"] == 10


def test_logprobs_are_those_of_the_model(model):
    out = LLM(model).generate([[3, 4, 5]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3))[0]
    seq = [3, 4, 5] + out.token_ids
    with torch.no_grad():
        expected = torch.log_softmax(model.module(torch.tensor([seq])).logits[0, 2:-1].float(), dim=-1)
    logprobs = out.outputs[0].logprobs  # vLLM's shape: per token, {token id: Logprob}
    assert len(logprobs) == 4
    for step, entry in enumerate(logprobs):
        chosen = entry[out.token_ids[step]]
        assert chosen.logprob == pytest.approx(float(expected[step, out.token_ids[step]]), abs=1e-4)
        assert chosen.rank == 1  # greedy
        top = expected[step].topk(3).indices.tolist()
        assert set(entry) == set(top) and [entry[t].rank for t in top] == [1, 2, 3]
        assert entry[top[1]].decoded_token == model.tokenizer.decode([top[1]], skip_special_tokens=False)
    total = sum(e[t].logprob for e, t in zip(logprobs, out.token_ids))
    assert out.outputs[0].cumulative_logprob == pytest.approx(total)


def test_stop_string_split_across_tokens_is_never_streamed(model):
    llm = LLM(model)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    free = llm.generate(["abc"], params)[0]
    pieces = [model.tokenizer.decode(free.token_ids[:i]) for i in range(len(free.token_ids) + 1)]
    boundary = next(len(p) for p in pieces if len(p) >= 4 and free.text[: len(p)] == p)
    stop = free.text[boundary - 2 : boundary + 1]  # two characters of one token, one of the next
    cut = free.text[: free.text.index(stop)]
    stopped = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,))
    streamed = list(llm.stream("abc", stopped))
    assert "".join(streamed) == cut == llm.generate(["abc"], stopped)[0].text


def test_closing_a_stream_aborts_its_request(model):
    llm = LLM(model, block_size=4, prefix_caching=False)
    pieces = llm.stream([1, 2, 3], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    next(pieces)
    pieces.close()
    assert not llm.engine.has_unfinished()
    assert llm.engine.cache.allocator.num_free == llm.engine.cache.allocator.num_blocks


def test_requests_the_engine_cannot_run_are_refused_with_the_reason(model):
    engine = LLMEngine(model, block_size=4, kv_cache_bytes=8 * 4 * _bytes_per_token(model))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.add_request([1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="larger kv_cache_bytes"):
        engine.add_request([1] * 30, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([1, 5000], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams(max_tokens=10))
    engine.add_request([1], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], GREEDY, request_id="x")


def test_int8_kv_cache_runs_the_same_requests(model):
    outs = LLM(model, kv_cache_dtype="int8", block_size=4).generate(PROMPTS, GREEDY)
    reference = [reference_greedy(model.module, p, 12) for p in PROMPTS]
    agree = sum(a == b for o, r in zip(outs, reference) for a, b in zip(o.token_ids, r))
    assert agree >= 0.8 * 12 * len(PROMPTS)  # int8 keys and values may flip a near-tie, rarely


def _bytes_per_token(model):
    from tuili.engine.paged_cache import PagedKVCache

    return PagedKVCache.bytes_per_token_of(model)


def test_bf16_activations_are_only_for_fp32_models_and_can_be_turned_off(model):
    from tuili.kernels.ops import bf16_is_fast

    assert LLMEngine(model, bf16_activations=False).compute_dtype is None
    assert LLMEngine(model, bf16_activations=True).compute_dtype == torch.bfloat16
    assert (LLMEngine(model).compute_dtype is not None) == bf16_is_fast()


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
def test_a_model_that_keeps_a_smaller_kv_cache_scores_the_same_without_one(kv):
    """quantize_kv_cache_ sets what every engine's cache stores, and the model's own forward without
    a cache (what perplexity runs) rounds keys and values the same way: the engine's log-probs are
    the uncached model's, not those of the float model."""
    from tuili.quant import quantize_kv_cache_

    model = random_tiny("llama-gqa")
    prompt = [3, 4, 5] + list(range(30, 50))
    float_logits = _logits(model.module, prompt)
    quantize_kv_cache_(model, kv)
    llm = LLM(model, block_size=4)
    assert llm.engine.cache.dtype == getattr(torch, kv)
    out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1))[0]
    engine = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, out.token_ids)])
    rounded = _scored(model.module, prompt, out.token_ids)
    quantize_kv_cache_(model, "float")
    unrounded = _scored(model.module, prompt, out.token_ids)
    quantize_kv_cache_(model, kv)
    assert (engine - rounded).abs().max() < (engine - unrounded).abs().max() / 4  # measured: 5e-7 against 1e-3
    # an explicit engine setting overrides the model's; "auto" follows it
    assert LLMEngine(model, kv_cache_dtype="float32").cache.dtype == torch.float32
    quantize_kv_cache_(model, "float")
    assert LLMEngine(model, kv_cache_dtype="auto").cache.dtype == torch.float32
    assert torch.equal(_logits(model.module, prompt), float_logits)  # "float" undoes it


def test_the_kv_cache_format_reaches_the_attention_layers_of_a_pruned_model():
    from tuili.prune.structured import prune_structured_
    from tuili.quant import quantize_kv_cache_

    model = random_tiny("llama-gqa")
    prune_structured_(model, {"mlp": 0.25, "layers": 1}, "l2", calib=torch.randint(3, 200, (2, 16)))
    prompt = list(range(30, 50))
    before = _logits(model.module, prompt)
    quantize_kv_cache_(model, "int8")
    assert model.module.model.layers[0].self_attn.config is model.config
    assert not torch.equal(_logits(model.module, prompt), before)


def test_a_kv_cache_format_tuili_cannot_store_is_refused(model):
    from tuili.quant import quantize_kv_cache_

    with pytest.raises(ValueError, match="unknown KV cache dtype 'float16': choose auto, float32, bfloat16, int8"):
        LLMEngine(model, kv_cache_dtype="float16")
    with pytest.raises(ValueError, match="unknown KV cache format 'fp8': choose one of float, bfloat16, int8"):
        quantize_kv_cache_(model, "fp8")
    with pytest.raises(ValueError, match="tuili's Llama models"):
        quantize_kv_cache_(torch.nn.Linear(2, 2), "int8")


@torch.no_grad()
def _logits(module, seq):
    return module(torch.tensor([seq])).logits[0].float()


def _scored(module, prompt, tokens):
    """The uncached model's log-probabilities of `tokens` following `prompt`."""
    logprobs = torch.log_softmax(_logits(module, prompt + tokens)[len(prompt) - 1 : -1], dim=-1)
    return logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]


def test_preemption_with_the_prefix_cache_never_leaves_every_block_to_waiting_requests():
    """A preempted request goes back to the front of the queue; the one it passes must not keep the
    prefix blocks it matched, or waiting requests can end up holding every block, and nothing runs."""
    model = random_tiny("llama-gqa", max_position_embeddings=1024)
    prompts = [list(range(3, 40)) * 2, list(range(50, 70)), [5, 6, 7], [9, 8, 7, 9, 8, 7, 9, 8]]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    tight = LLM(model, block_size=4, kv_cache_bytes=40 * 4 * _bytes_per_token(model))
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in LLM(model, block_size=4).generate(prompts, params)]
