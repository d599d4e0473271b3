"""Structured output in the engine: what a grammar allows is all a request generates, whatever the
model, seed or temperature; the mask changes nothing else (free requests in the same batch, greedy
text the constraint already allows, the log-probabilities reported); bad constraints are refused."""

import json
import re

import jsonschema
import pytest
import torch
from helpers import random_tiny

from tuili.engine import LLM, SamplingParams
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.structured import StructuredOutputsParams as Constraint

# bounded strings and numbers: a random model would otherwise write one string until max_tokens
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 99}, "minItems": 2, "maxItems": 4},
    {"enum": ["red", "green", "blue"]},
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}, "y": {"type": "null"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": {"anyOf": [{"type": "string", "pattern": "^[a-z]{1,4}$"}, {"type": "integer", "maximum": 9}]},
        },
        "required": ["point", "label"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def llm():
    return LLM(random_tiny("llama-gqa"))


def run(llm, prompts, **params):
    params = SamplingParams(**{"max_tokens": 200, **params})
    return [c.outputs[0] for c in llm.generate(prompts, params)]


@pytest.mark.parametrize("temperature", [0, 0.7, 1.5])
def test_every_output_follows_its_json_schema(llm, temperature):
    prompts = [f"prompt {i}: " for i in range(3)]
    for schema in SCHEMAS:
        params = [
            SamplingParams(
                max_tokens=200, temperature=temperature, seed=seed, structured_outputs=Constraint(json=schema)
            )
            for seed in range(len(prompts))
        ]
        for completion in llm.generate(prompts, params):
            out = completion.outputs[0]
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), schema)


@pytest.mark.parametrize(
    "constraint, check",
    [
        (Constraint(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        (Constraint(choice=("yes", "no", "not sure")), lambda t: t in ("yes", "no", "not sure")),
        (Constraint(json_object=True, whitespace_pattern=r"[ ]?"), lambda t: isinstance(json.loads(t), dict)),
        (Constraint(grammar='root ::= "A" [0-9] [0-9]? "!"'), lambda t: re.fullmatch(r"A[0-9]{1,2}!", t)),
        (Constraint(grammar='start: "x" /[a-c]{1,5}/ "."'), lambda t: re.fullmatch(r"x[a-c]{1,5}\.", t)),
    ],
    ids=["regex", "choice", "json-object", "gbnf", "lark"],
)
def test_regex_choice_json_object_and_grammars(llm, constraint, check):
    for out in run(llm, ["a", "bb", "ccc", "dddd"], temperature=1.0, seed=7, structured_outputs=constraint):
        if constraint.json_object and out.finish_reason == "length":
            continue  # any object: a random model may write keys until max_tokens
        assert out.finish_reason == "stop" and check(out.text), out.text


def test_the_mask_changes_nothing_the_constraint_already_allows(default_model):
    llm = LLM(default_model)  # real text: the constraint is the model's own greedy answer, spelled as a choice
    prompt = "The capital of France is"
    free = run(llm, [prompt], temperature=0, max_tokens=8, logprobs=2)[0]
    guided, beside = llm.generate(
        [prompt, prompt],
        [
            SamplingParams(max_tokens=8, temperature=0, logprobs=2, structured_outputs=Constraint(choice=(free.text,))),
            SamplingParams(max_tokens=8, temperature=0, logprobs=2),
        ],
    )
    constrained = guided.outputs[0]
    assert constrained.token_ids == free.token_ids and constrained.finish_reason == "stop"
    assert beside.outputs[0].token_ids == free.token_ids  # a free request in the same batch
    assert constrained.logprobs == free.logprobs  # the model's own log-probabilities, not the masked ones


def test_a_complete_grammar_ends_the_request_even_with_ignore_eos(llm):
    out = run(llm, ["x"], temperature=1.0, seed=1, ignore_eos=True, structured_outputs=Constraint(choice=("ab",)))[0]
    assert (out.text, out.finish_reason) == ("ab", "stop")


def test_max_tokens_cuts_a_constrained_output_with_finish_reason_length(llm):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 30}
    out = run(llm, ["x"], temperature=0, max_tokens=5, structured_outputs=Constraint(json=schema))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and out.text.startswith("[")


def test_preempted_requests_keep_their_place_in_the_grammar():
    model = random_tiny("llama-gqa")
    prompts = [f"{i} " * 20 for i in range(6)]
    constraint = Constraint(json=SCHEMAS[0])
    params = SamplingParams(max_tokens=60, temperature=0, structured_outputs=constraint)
    roomy = [c.outputs[0].text for c in LLM(model).generate(prompts, params)]
    per_token = PagedKVCache.bytes_per_token(model.config, torch.float32)
    tight = LLM(model, block_size=4, kv_cache_bytes=200 * per_token)  # room for about two of the six
    texts = [c.outputs[0].text for c in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert texts == roomy
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS[0])


@pytest.mark.parametrize(
    "constraint, words",
    [
        (dict(json={"type": "frobnicate"}), "cannot be compiled"),
        (dict(json='{"type": "object"'), "not valid JSON"),
        (dict(regex="a("), "cannot be compiled"),
        (dict(grammar="start: undefined_rule"), "cannot be compiled"),
        (dict(regex="a", choice=("a",)), "exactly one"),
        (dict(), "exactly one"),
        (dict(choice=()), "non-empty"),
        (dict(regex="a", whitespace_pattern=" "), "JSON output"),
        (dict(json={"type": "string", "minLength": 3, "maxLength": 1}), "constraint"),
    ],
)
def test_bad_constraints_are_refused_before_anything_runs(llm, constraint, words):
    with pytest.raises(ValueError, match=words):
        llm.engine.add_request("x", SamplingParams(structured_outputs=Constraint(**constraint)))
    assert not llm.engine.has_unfinished()


def test_compiled_constraints_are_cached_and_copied_per_request(llm):
    grammars = llm.engine.grammars
    spec = Constraint(json=SCHEMAS[1])
    assert grammars.compile(spec) is grammars.compile(Constraint(json=json.dumps(SCHEMAS[1])))
    one, two = grammars.guide(spec), grammars.guide(spec)
    one.accept(grammars.tokenizer.tokenize_str('{"')[0])
    assert not grammars.masks([one]).equal(grammars.masks([two]))
