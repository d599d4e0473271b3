"""Bad requests get a 4xx with an OpenAI error object that says what is wrong, and the server keeps
serving; limits, API keys and a full queue answer with their own status codes."""

import asyncio
import json
import time

import httpx
import pytest
from live import MODEL, live_server, metric

from tuili.server import ServerConfig

GOOD = {"model": MODEL, "prompt": "ok", "max_tokens": 3, "temperature": 0}


def post(base, path, body, **kwargs):
    return httpx.post(f"{base}{path}", json=body, timeout=30, **kwargs)


def assert_error(response, status, *words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    return error


def still_serving(base):
    r = post(base, "/v1/completions", GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "content, words",
    [
        (b'{"model": "tiny", "prompt": ', ["not valid JSON"]),
        (b"\xff\xfe{not utf-8}", ["not valid UTF-8"]),
        (b"[1, 2, 3]", ["must be a JSON object"]),
        (b"", ["missing"]),
    ],
)
def test_malformed_bodies(base, content, words):
    r = httpx.post(f"{base}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400, *words)
    still_serving(base)


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"max_tokens": "many"}, "max_tokens", ["integer"]),
        ({"temperature": -1}, "temperature", ["greater than or equal to 0"]),
        ({"top_p": 0}, "top_p", ["greater than 0"]),
        ({"n": 0}, "n", ["greater than or equal to 1"]),
        ({"max_tokens": 0}, "max_tokens", ["without echo"]),
        ({"max_tokens": -1}, "max_tokens", ["greater than or equal to 0"]),
        ({"presence_penalty": 3}, "presence_penalty", ["less than or equal to 2"]),
        ({"logprobs": 50}, "logprobs", ["less than or equal to 20"]),
        ({"stop": [""]}, "stop", ["must not be empty"]),
        ({"prompt": None}, "prompt", []),
        ({"logit_bias": {"five": 1}}, "logit_bias", ["token ids"]),
        ({"logit_bias": {"5": 101}}, "logit_bias", ["100"]),
        ({"logit_bias": {"99999": 1}}, None, ["logit_bias names token 99999"]),
    ],
)
def test_wrong_types_and_values(base, change, param, words):
    error = assert_error(post(base, "/v1/completions", {**GOOD, **change}), 400, *words)
    if param:
        assert error["param"] == param
    still_serving(base)


@pytest.mark.parametrize(
    "raw",
    ['{"model": "tiny", "prompt": "x", "temperature": NaN}', '{"model": "tiny", "prompt": "x", "top_p": Infinity}'],
)
def test_nan_and_infinity_are_refused(base, raw):
    r = httpx.post(f"{base}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, "finite")
    still_serving(base)


def test_unknown_model_is_404(base):
    error = assert_error(post(base, "/v1/completions", {**GOOD, "model": "gpt-9"}), 404, "gpt-9", MODEL)
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize("prompt", ["", [], [[]]])
def test_empty_prompt(base, prompt):
    assert_error(post(base, "/v1/completions", {**GOOD, "prompt": prompt}), 400, "empty")


def test_token_ids_outside_the_vocabulary(base):
    assert_error(post(base, "/v1/completions", {**GOOD, "prompt": [1, 99999]}), 400, "vocabulary")


def test_prompt_beyond_the_context(base, served):
    context = served[1].context
    assert_error(post(base, "/v1/completions", {**GOOD, "prompt": "x" * (context + 5)}), 400, "context")
    r = post(base, "/v1/completions", {**GOOD, "prompt": "x" * (context - 2), "max_tokens": 10})
    assert_error(r, 400, "exceeds", "context")
    still_serving(base)


def test_chat_errors(base):
    assert_error(post(base, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400, "messages")
    assert_error(
        post(base, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
        400,
        "role",
    )
    assert_error(
        post(
            base,
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        ),
        400,
        "tools",
    )
    still_serving(base)


def test_tokenize_and_detokenize_round_trip(base):
    ids = post(base, "/tokenize", {"prompt": "héllo"}).json()
    assert ids["count"] == len("héllo".encode()) and ids["max_model_len"] == 256
    assert post(base, "/detokenize", {"tokens": ids["tokens"]}).json() == {"prompt": "héllo"}
    chat = post(base, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2
    assert_error(post(base, "/detokenize", {"tokens": [5, 100000]}), 400, "vocabulary")
    assert_error(post(base, "/tokenize", {"prompt": "a", "messages": []}), 400, "exactly one")


def test_limits_api_key_and_body_size(tiny_model):
    config = ServerConfig(
        model_names=(MODEL,), api_key="s3cret", max_prompt_tokens=8, max_tokens=5, max_body_bytes=2000
    )
    with live_server(tiny_model, config) as (base, _):
        assert_error(post(base, "/v1/completions", GOOD), 401, "API key")
        key = {"Authorization": "Bearer s3cret"}
        assert_error(post(base, "/v1/completions", GOOD, headers={"Authorization": "Bearer wrong"}), 401)
        assert post(base, "/v1/completions", GOOD, headers=key).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200  # operations stay open
        assert httpx.get(f"{base}/metrics").status_code == 200
        assert_error(post(base, "/v1/completions", {**GOOD, "prompt": "x" * 9}, headers=key), 400, "limit of 8")
        assert_error(post(base, "/v1/completions", {**GOOD, "max_tokens": 6}, headers=key), 400, "limit of 5")
        assert_error(post(base, "/v1/completions", {**GOOD, "prompt": "x" * 3000}, headers=key), 413, "2000 bytes")
        assert post(base, "/v1/completions", GOOD, headers=key).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(tiny_model):
    config = ServerConfig(model_names=(MODEL,), max_queued_requests=4)
    long = {**GOOD, "max_tokens": 240, "ignore_eos": True, "n": 3}

    async def main(base, server):
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            running = asyncio.create_task(client.post("/v1/completions", json=long))
            while server.in_flight < 3:  # three sequences are in
                await asyncio.sleep(0.001)
            refused = await client.post("/v1/completions", json={**GOOD, "n": 2})
            return refused, await running

    with live_server(tiny_model, config) as (base, server):
        too_many = post(base, "/v1/completions", {**GOOD, "n": 5})  # more than the limit on its own
        assert_error(too_many, 429, "busy")
        refused, done = asyncio.run(main(base, server))
        assert_error(refused, 429, "busy")
        assert refused.headers["retry-after"] == "1"
        assert done.status_code == 200 and len(done.json()["choices"]) == 3
        assert server.in_flight == 0
        still_serving(base)


def test_a_request_that_cannot_start_in_time_gets_503_and_is_counted(tiny_model):
    long = {**GOOD, "max_tokens": 240, "ignore_eos": True}

    async def main(base, server):
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            running = asyncio.create_task(client.post("/v1/completions", json=long))
            while server.in_flight < 1:
                await asyncio.sleep(0.001)
            late = await client.post("/v1/completions", json=GOOD)  # the one place is taken
            async with client.stream("POST", "/v1/completions", json={**GOOD, "stream": True}) as r:
                events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            return late, events, await running

    with live_server(tiny_model, max_num_seqs=1, max_queue_time=0.05) as (base, server):
        late, events, done = asyncio.run(main(base, server))
        assert_error(late, 503, "overloaded")
        assert late.headers["retry-after"] == "1"
        error = json.loads(events[-1][6:])["error"]  # a stream has started: the refusal is its last event
        assert "overloaded" in error["message"]
        assert done.status_code == 200
        assert metric(base, "tuili_request_queue_timeouts_total") == 2
        assert metric(base, "tuili_scheduler_max_queue_time") == 0.05
        still_serving(base)


def test_requests_before_warm_up_finishes_get_503(tiny_model):
    from tuili.engine import AsyncLLM
    from tuili.server import Server

    server = Server(AsyncLLM(tiny_model), ServerConfig(model_names=(MODEL,)))
    try:
        with pytest.raises(Exception) as info:
            server.limits.serving(MODEL, server.ready)
        assert info.value.status == 503 and "warming up" in info.value.message
    finally:
        server.llm.shutdown()


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
# every sampling field at the edges of what it accepts: served (200), never a 5xx, the engine alive after
EDGES = [
    {"temperature": 0},
    {"temperature": 1e-30},
    {"temperature": 1.1e-5},
    {"temperature": 2},
    {"top_p": 5e-324},
    {"top_p": 1e-30, "temperature": 2},
    {"top_p": 1},
    {"top_k": -1},
    {"top_k": 1},
    {"top_k": 10**30},
    {"min_p": 1},
    {"min_p": 0.999999},
    {"repetition_penalty": 1e-300, "temperature": 1},
    {"repetition_penalty": 100, "temperature": 1},
    {"presence_penalty": 2, "frequency_penalty": -2},
    {"presence_penalty": -2, "frequency_penalty": 2},
    {"seed": 2**63 - 1, "n": 4, "temperature": 1},
    {"seed": -(2**63), "temperature": 1},
    {"seed": 0},
    {"logprobs": 20, "repetition_penalty": 1e-300, "temperature": 1e-5},
    {"n": 16, "max_tokens": 1},
    {"stop": ["\x00", "a" * 1000]},
    {"stop_token_ids": [0, 258]},
    {"ignore_eos": True},
]
BEYOND = [
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"temperature": 2.01}, "temperature"),
    ({"top_p": 1.0001}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 101}, "repetition_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"n": 17}, "n"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logprobs": -1}, "logprobs"),
]


@pytest.mark.parametrize("change", EDGES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())[:40])
def test_extreme_but_valid_sampling_values_are_served(base, change):
    r = post(base, "/v1/completions", {**GOOD, **change})
    assert r.status_code == 200, r.text
    assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])
    assert httpx.get(f"{base}/health").status_code == 200


@pytest.mark.parametrize("change, param", BEYOND, ids=lambda c: str(c)[:40])
def test_values_beyond_the_documented_ranges_are_a_400_naming_the_field(base, change, param):
    for path, body in (("/v1/completions", {**GOOD, **change}), ("/v1/chat/completions", {**CHAT, **change})):
        error = assert_error(post(base, path, body), 400)
        assert error["param"] == param, error
    still_serving(base)


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt"),
        ("/v1/completions", '{"model": "tiny", "prompt": "ok", "stop": ["\\ud800"]}', "stop"),
        ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}', "messages"),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
            "messages",
        ),
        ("/v1/embeddings", '{"model": "tiny", "input": "\\ud800"}', "input"),
        ("/v1/loglikelihood", '{"model": "tiny", "input": {"context": "a", "continuation": "\\ud800"}}', "input"),
        ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
        ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
        ("/v1/completions", '{"model": "tiny", "prompt": "ok", "metadata": {"\\ud800": 1}}', "metadata"),
    ],
)
def test_invalid_unicode_is_a_400_naming_the_field(base, path, raw, param):
    r = httpx.post(f"{base}{path}", content=raw.encode(), headers={"content-type": "application/json"})
    error = assert_error(r, 400, "invalid Unicode", "surrogate")
    assert error["param"] == param
    still_serving(base)


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions", ["legacy", "tools"]),
        ("/v1/chat/completions", {**CHAT, "function_call": "auto"}, "function_call", ["legacy", "tool_choice"]),
        ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice", ["needs tools"]),
        ("/v1/completions", {**GOOD, "frobnicate": 1}, "frobnicate", ["unknown field"]),
        ("/v1/embeddings", {"model": MODEL, "input": "x", "truncate": True}, "truncate", ["unknown field"]),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}},
            "stream_options",
            ["continuous_usage_stats"],
        ),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
                    {"role": "tool", "content": "sunny", "tool_call_id": "1"},
                ],
            },
            "messages",
            ["tool"],
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "x", "audio": {}}]},
            "messages",
            ["audio"],
        ),
    ],
)
def test_fields_that_would_change_the_answer_are_refused(base, path, body, param, words):
    error = assert_error(post(base, path, body), 400, *words)
    assert error["param"] == param
    still_serving(base)


def test_bookkeeping_fields_are_ignored_and_named_in_a_header(base):
    r = post(
        base,
        "/v1/completions",
        {**GOOD, "user": "u1", "metadata": {"team": "a"}, "store": False, "service_tier": "auto"},
    )
    assert r.status_code == 200 and r.headers["x-tuili-ignored-fields"] == "metadata, service_tier, store, user"
    r = post(base, "/v1/embeddings", {"model": MODEL, "input": "x", "metadata": {}})
    assert r.status_code == 200 and r.headers["x-tuili-ignored-fields"] == "metadata"
    assert "x-tuili-ignored-fields" not in post(base, "/v1/completions", GOOD).headers


def test_a_generation_past_the_request_timeout_is_stopped(tiny_model):
    config = ServerConfig(model_names=(MODEL,), request_timeout=0.3)
    slow = {**GOOD, "max_tokens": 200, "ignore_eos": True}
    with live_server(tiny_model, config, block_size=4) as (base, server):
        engine_step = server.llm.engine.step

        def slow_step():
            time.sleep(0.01)
            return engine_step()

        server.llm.engine.step = slow_step
        assert_error(post(base, "/v1/completions", slow), 504, "time limit of 0.3 s")
        with httpx.stream("POST", f"{base}/v1/completions", json={**slow, "stream": True}, timeout=30) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert "time limit" in events[-1] and "[DONE]" not in events[-1]
        deadline = time.monotonic() + 5  # the aborts reach the engine thread between its steps
        while (server.in_flight or server.llm.engine.stats()["kv_usage"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.in_flight == 0 and server.llm.engine.stats()["kv_usage"] == 0
        still_serving(base)
