"""Structured output through the server: the official openai client's `parse` with a pydantic model,
`response_format` on both endpoints, vLLM's `guided_*` fields and `structured_outputs` object, streamed
and not; a constraint that cannot be honoured is a 400 naming its field, and the server serves on."""

import json
from typing import Annotated, Literal

import httpx
import openai
import pydantic
import pytest
from live import MODEL

from tests.server.test_errors import GOOD, assert_error, post, still_serving

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "a person, as JSON"}], "max_tokens": 120}


class Person(pydantic.BaseModel):
    name: Annotated[str, pydantic.Field(max_length=6)]
    age: Annotated[int, pydantic.Field(ge=0, le=120)]
    mood: Literal["calm", "busy"]


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("temperature, seed", [(0, None), (0.8, 1), (1.2, 2)])
def test_the_openai_client_parses_a_pydantic_model(client, temperature, seed):
    r = client.chat.completions.parse(
        model=MODEL, messages=CHAT["messages"], response_format=Person, temperature=temperature, seed=seed
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Person)


def test_a_streamed_json_schema_answer_parses(base):
    schema = {**Person.model_json_schema(), "additionalProperties": False}  # as OpenAI's strict mode asks
    body = {**CHAT, "stream": True, "temperature": 1.0, "seed": 3}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    text, reasons = "", []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                reasons.append(choice["finish_reason"])
    assert reasons[-1] == "stop"
    Person.model_validate_json(text)


@pytest.mark.parametrize(
    "fields, check",
    [
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"guided_regex": "[a-c]{2,4}"}, lambda t: 2 <= len(t) <= 4 and set(t) <= set("abc")),
        ({"guided_json": {"type": "integer", "minimum": 5, "maximum": 7}}, lambda t: json.loads(t) in (5, 6, 7)),
        ({"guided_grammar": 'root ::= "x" | "y" "z"'}, lambda t: t in ("x", "yz")),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        ({"structured_outputs": {"json": {"enum": [1, 2]}}}, lambda t: json.loads(t) in (1, 2)),
    ],
    ids=["json-object", "choice", "regex", "json", "gbnf", "structured-choice", "structured-json"],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_each_way_of_asking_on_both_endpoints(base, path, fields, check):
    body = {**(GOOD if path == "/v1/completions" else CHAT), "max_tokens": 60, "temperature": 1.0, "n": 3, "seed": 5}
    if "json_object" in json.dumps(fields):
        body["structured_outputs"] = {"json_object": True, "whitespace_pattern": "[ ]?"}  # a bounded object
        body["max_tokens"] = 200
        fields = {}
    r = post(base, path, {**body, **fields})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        text = choice["text"] if path == "/v1/completions" else choice["message"]["content"]
        if choice["finish_reason"] == "length" and "structured_outputs" in body:
            continue  # any object: a random model may write keys until max_tokens
        assert choice["finish_reason"] == "stop" and check(text), text


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"guided_json": {"type": "frobnicate"}}, "guided_json", ["cannot be compiled"]),
        ({"guided_json": '{"type": '}, "guided_json", ["not valid JSON"]),
        ({"guided_regex": "a("}, "guided_regex", ["cannot be compiled"]),
        ({"guided_grammar": "start: nothing_here"}, "guided_grammar", ["cannot be compiled"]),
        ({"guided_choice": []}, "guided_choice", ["non-empty"]),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", ["one structured-output constraint"]),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "guided_regex",
            ["one structured-output constraint"],
        ),
        ({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", ["llguidance"]),
        ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern", ["guided_json"]),
        ({"response_format": {"type": "json_schema"}}, "response_format", ["json_schema"]),
        ({"response_format": {"type": "yaml"}}, "response_format", []),
        ({"structured_outputs": {"regex": "a", "frobnicate": 1}}, "structured_outputs", []),
        ({"guided_json": {"type": "string", "minLength": 3, "maxLength": 1}}, "guided_json", ["constraint"]),
    ],
)
def test_constraints_that_cannot_be_honoured_are_a_400(base, fields, param, words):
    error = assert_error(post(base, "/v1/completions", {**GOOD, **fields}), 400, *words)
    assert error["param"] == param
    still_serving(base)
