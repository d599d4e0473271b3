"""`echo` with `logprobs` on /v1/completions, as evaluation harnesses send it (lm-evaluation-harness's
local-completions: `echo: true, max_tokens: 1, logprobs: 1`): the prompt comes back before the
completion with each token's log-probability, the first one null, equal to the engine's own."""

import json

import httpx
import openai
import pytest
from live import MODEL

from tuili.engine import LLM, SamplingParams
from tuili.engine.pooling import loglikelihood


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def prompt_logprobs(model, ids):
    return loglikelihood(model, [(ids[:1], ids[1:])])[0].token_logprobs


def test_lm_evals_request_gives_the_prompt_logprobs_the_engine_computes(client, tiny_model):
    prompt = "The quick brown fox"
    ids = tiny_model.tokenizer.encode(prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    choice = r.choices[0]
    generated = LLM(tiny_model).generate([ids], SamplingParams(max_tokens=1, temperature=0, logprobs=1))[0]
    assert choice.text == prompt + generated.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:-1] == pytest.approx(prompt_logprobs(tiny_model, ids), abs=1e-4)
    assert lp.token_logprobs[-1] == pytest.approx(generated.outputs[0].cumulative_logprob, abs=1e-4)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero_returns_the_prompt_and_its_logprobs_only(base, tiny_model, stream):
    ids = [5, 9, 31, 77, 12]
    body = {"model": MODEL, "prompt": [ids, ids[:3]], "max_tokens": 0, "echo": True, "logprobs": 2, "stream": stream}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert r.text.rstrip().endswith("data: [DONE]")
        choices = sorted((c for e in events for c in e["choices"]), key=lambda c: c["index"])
    else:
        choices = r.json()["choices"]
        assert r.json()["usage"]["completion_tokens"] == 0
    for choice, prompt in zip(choices, (ids, ids[:3])):
        assert choice["finish_reason"] == "length"
        assert choice["text"] == tiny_model.tokenizer.decode(prompt, skip_special_tokens=False)
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(prompt_logprobs(tiny_model, prompt), abs=1e-4)


def test_a_streamed_echo_opens_with_the_prompt(base, tiny_model):
    body = {"model": MODEL, "prompt": "echo me", "max_tokens": 4, "temperature": 0, "echo": True, "stream": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.text.splitlines() if line.startswith("data: {")]
    generated = LLM(tiny_model).generate(["echo me"], SamplingParams(max_tokens=4, temperature=0))[0].text
    assert texts[0] == "echo me" and "".join(texts) == "echo me" + generated


def test_max_tokens_zero_without_echo_is_a_400(base):
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_vllms_prompt_logprobs_on_both_endpoints(base, tiny_model):
    ids = [5, 9, 31, 77, 12, 40]
    body = {"model": MODEL, "prompt": ids, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    choice = httpx.post(f"{base}/v1/completions", json=body, timeout=30).json()["choices"][0]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    expected = prompt_logprobs(tiny_model, ids)
    for token, entry, logprob in zip(ids[1:], entries[1:], expected):
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(logprob, abs=1e-4) and own["rank"] >= 1
        ranked = sorted((v for k, v in entry.items() if k != str(token) or v["rank"] <= 2), key=lambda v: v["rank"])
        assert [v["rank"] for v in ranked][:2] == [1, 2] and len(entry) <= 3
        assert own["decoded_token"] == tiny_model.tokenizer.decode([token], skip_special_tokens=False)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 0}
    prompt_tokens = httpx.post(f"{base}/tokenize", json={"messages": chat["messages"]}).json()["count"]
    entries = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=30).json()["choices"][0]["prompt_logprobs"]
    assert len(entries) == prompt_tokens and all(len(e) == 1 for e in entries[1:])
    streamed = httpx.post(f"{base}/v1/completions", json={**body, "stream": True}, timeout=30)
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"
