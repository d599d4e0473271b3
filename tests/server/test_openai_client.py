"""The official `openai` package against a live server: what it sends and parses works unchanged,
and the server's greedy text is the engine's."""

import math

import numpy as np
import openai
import pytest
from live import MODEL

from tuili.engine import LLM, SamplingParams
from tuili.engine.pooling import embed


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def offline(model, prompt, max_tokens, **kw):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **kw)
    return LLM(model).generate([prompt], params)[0]


def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_greedy_text_and_usage_equal_the_engine(client, tiny_model):
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12, temperature=0)
    expected = offline(tiny_model, "hello world", 12)
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids) == len("hello world")
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_streamed_completion_concatenates_to_the_full_text(client, tiny_model):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="stream me",
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = offline(tiny_model, "stream me", 16)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_stats_put_each_choices_usage_in_every_chunk(client, tiny_model, chat):
    """vLLM's stream_options extension, as guidellm sends it: usage so far in every chunk."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    common = dict(model=MODEL, max_tokens=12, temperature=0, stream=True, stream_options=options)
    if chat:
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "count"}], **common))
        expected = offline(tiny_model, [{"role": "user", "content": "count"}], 12)
    else:
        chunks = list(client.completions.create(prompt="count with me", **common))
        expected = offline(tiny_model, "count with me", 12)
    prompt = len(expected.prompt_token_ids)
    assert all(c.usage is not None and c.usage.prompt_tokens == prompt for c in chunks)
    done = [c.usage.completion_tokens for c in chunks]
    assert done == sorted(done) and done[-1] == len(expected.token_ids)
    assert all(c.usage.total_tokens == prompt + c.usage.completion_tokens for c in chunks)
    assert chunks[-1].choices == []  # the usage chunk still closes the stream


def test_chat_uses_the_chat_template(client, tiny_model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    expected = offline(tiny_model, messages, 10)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streamed_chat_opens_with_the_role_then_streams_content(client, tiny_model):
    messages = [{"role": "user", "content": "tell me"}]
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == offline(tiny_model, messages, 12).text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_n_choices_and_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, prompt="abc", max_tokens=8, temperature=1.0, n=3, seed=7)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # each choice has its own seed


def test_several_prompts_give_choices_in_prompt_order(client, tiny_model):
    r = client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == [offline(tiny_model, p, 6).text for p in ("one", "two")]


def test_stop_strings_cut_the_text(client, tiny_model):
    full = offline(tiny_model, "stop test", 20, ignore_eos=True).text
    stop = full[5:7]
    r = client.completions.create(
        model=MODEL, prompt="stop test", max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_completion_logprobs_are_log_probabilities_of_the_chosen_tokens(client):
    r = client.completions.create(model=MODEL, prompt="probe", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) <= 3
        assert token in top and max(top.values()) <= value + 1e-5  # greedy: the chosen token is the top one
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_chat_logprobs_have_tokens_bytes_and_alternatives(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)


def test_extension_parameters_are_accepted(client, tiny_model):
    r = client.completions.create(
        model=MODEL,
        prompt="ext",
        max_tokens=6,
        temperature=0,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3},
    )
    expected = offline(tiny_model, "ext", 6, repetition_penalty=1.3)
    assert r.choices[0].text == expected.text


def test_embeddings_in_float_and_base64_are_unit_vectors_equal_to_the_engine(client, tiny_model):
    texts = ["first sentence", "a second, longer sentence than the first"]
    as_float = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    as_default = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    reference = embed(tiny_model, [tiny_model.tokenizer.encode(t) for t in texts])
    for a, b, ref in zip(as_float.data, as_default.data, reference):
        assert len(a.embedding) == tiny_model.config.hidden_size
        assert math.isclose(float(np.linalg.norm(a.embedding)), 1.0, rel_tol=1e-5)
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-6)
        np.testing.assert_allclose(a.embedding, ref.numpy(), atol=1e-5)
    assert as_float.usage.prompt_tokens == sum(len(t) for t in texts)
