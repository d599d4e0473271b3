"""Tool calls through the server with the official openai client: `required` and a named function
always give calls whose arguments follow the schema, streamed and not; `auto` gives text or calls as
the model writes them; `parallel_tool_calls: false` gives one; calls and results in the history are
rendered; wrong tool fields are a 400 naming the field, and the server serves on."""

import json

import httpx
import jsonschema
import openai
import pytest
from helpers import random_tiny
from live import MODEL, live_server

from tests.server.test_errors import assert_error, post, still_serving
from tuili.server import ServerConfig

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "days": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
NOW = {
    "type": "function",
    "function": {"name": "now", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
TOOLS = [WEATHER, NOW]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def long_model():
    """The tiny model with room for the tools' system prompt (its tokenizer spends a token a byte)."""
    return random_tiny("llama-gqa", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def base(long_model):
    with live_server(long_model, block_size=4) as (url, _):
        yield url


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def check_calls(calls) -> list[str]:
    """The names of `calls` (openai objects), each with arguments that follow its function's schema."""
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({call.id for call in calls}) == len(calls)
    return [call.function.name for call in calls]


@pytest.mark.parametrize("temperature, seed", [(0, None), (0.7, 1), (1.0, 2), (1.3, 3)])
def test_required_always_gives_calls_that_follow_the_schema(client, temperature, seed):
    # one call, so that a random model's reply ends (with parallel calls it may go on calling)
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=temperature, seed=seed,
        max_tokens=200, parallel_tool_calls=False,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls)


def test_a_named_function_is_the_one_called(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=named, temperature=1.0, seed=5, max_tokens=200, n=3
    )
    for choice in r.choices:
        assert check_calls(choice.message.tool_calls) == ["get_weather"]
        assert choice.message.content is None and choice.finish_reason == "tool_calls"


def test_parallel_calls_off_gives_one_call(client):
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            temperature=1.0, seed=seed, max_tokens=200,
        )  # fmt: skip
        assert len(check_calls(r.choices[0].message.tool_calls)) == 1


def test_streamed_calls_are_the_same_as_the_whole_response(client):
    options = dict(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200,
        parallel_tool_calls=False,
    )  # fmt: skip
    whole = client.chat.completions.create(**options).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**options, stream=True):
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        assert not choice.delta.content
        for delta in choice.delta.tool_calls or ():
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
    assert reasons[-1] == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole
    ]


def test_none_and_no_tools_give_text(client):
    for extra in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, **extra)
        assert r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason == "length"


HISTORY = [
    *MESSAGES,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def test_calls_and_results_in_the_history_reach_the_prompt(base, client):
    r = client.chat.completions.create(model=MODEL, messages=HISTORY, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # the history as the model sees it (this template knows no tools: written out, Hermes style)
    ids = post(base, "/tokenize", {"model": MODEL, "messages": HISTORY, "tools": TOOLS}).json()["tokens"]
    text = post(base, "/detokenize", {"model": MODEL, "tokens": ids}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert text.startswith("<|im_start|>system\nYou are a function calling AI model.")


def scripted(engine, text: str) -> None:
    """The engine writes `text`, token by token (each one the grammar must allow), then ends."""
    ids = engine.model.tokenizer.encode(text, add_special_tokens=False)
    eos = engine.model.tokenizer.eos_token_id

    def pick(request, row, greedy, allowed):
        token = ids[len(request.output_ids)] if len(request.output_ids) < len(ids) else eos
        assert allowed is None or bool(allowed[token]), f"the grammar refused {token}"
        return token, None

    engine._pick = pick


@pytest.mark.parametrize(
    "text, content, names",
    [
        ("It is sunny.", "It is sunny.", None),
        (
            'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
            "Checking.\n",
            ["get_weather", "now"],
        ),
    ],
)
def test_auto_gives_the_text_and_the_calls_the_model_writes(long_model, text, content, names):
    config = ServerConfig(model_names=(MODEL,), warmup=False)
    with live_server(long_model, config, block_size=4) as (base, server):
        scripted(server.llm.engine, text)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=200)
        message = r.choices[0].message
        assert message.content == content
        assert (check_calls(message.tool_calls) if names else message.tool_calls) == names
        assert r.choices[0].finish_reason == ("tool_calls" if names else "stop")
        streamed, calls = "", []
        for chunk in client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=200, stream=True
        ):
            streamed += chunk.choices[0].delta.content or ""
            calls += [c.function.name for c in chunk.choices[0].delta.tool_calls or ()]
        assert streamed == content and calls == (names or [])


CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5}


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"tool_choice": "required"}, "tool_choice", ["needs tools"]),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", ["nope"]),
        ({"tools": [WEATHER, WEATHER]}, "tools", ["same name"]),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", []),
        ({"tools": [{"type": "retrieval"}]}, "tools", []),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", ["tool calls"]),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
            "tools",
            ["cannot be compiled"],
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages", ["tool_call_id"]),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages", []),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages", ["legacy"]),
    ],
)
def test_wrong_tool_fields_are_a_400_naming_the_field(base, change, param, words):
    error = assert_error(post(base, "/v1/chat/completions", {**CHAT, **change}), 400, *words)
    assert error["param"] == param or error["param"].startswith(param), error
    still_serving(base)


def test_the_stream_carries_calls_as_raw_sse(base):
    body = {**CHAT, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200, "stream": True, "seed": 1}
    events = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls and all(set(c) == {"index", "id", "type", "function"} for c in calls)
    assert [c["index"] for c in calls] == list(range(len(calls)))
