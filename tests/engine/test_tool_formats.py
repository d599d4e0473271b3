"""Tool-call formats: each one's grammar allows exactly the replies its `tool_choice` permits, its
parser reads calls back the same whole or token by token, and conversations with tools render for
templates that know tools and for those that do not."""

import json
from pathlib import Path

import pytest
from helpers import CHAT_TEMPLATE, tiny_tokenizer

from tuili.engine.structured import Grammars
from tuili.engine.tools import Function, Hermes, Llama3Json, ToolFormat, ToolStream, conversation

WEATHER = Function(
    "get_weather",
    "the weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
)
NOW = Function("now")
FUNCTIONS = [WEATHER, NOW]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HERMES_NOW = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_NOW = '{"name": "now", "parameters": {}}'


@pytest.fixture(scope="module")
def grammars():
    tokenizer = tiny_tokenizer()
    return tokenizer, Grammars(tokenizer.backend.to_str(), 259, [2])


def verdict(grammars, fmt: ToolFormat, choice: str, parallel: bool, text: str) -> str:
    """'refused' if the grammar forbids a token of `text`, else 'complete' or 'open' (more must follow)."""
    tokenizer, g = grammars
    guide = g.guide(fmt.constraint(FUNCTIONS, choice, parallel))
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not g.masks([guide])[0, token]:
            return "refused"
        guide.accept(token)
    return "complete" if guide.matcher.is_accepting() else "open"


@pytest.mark.parametrize(
    "choice, parallel, text, expected",
    [
        ("auto", True, "It is sunny.", "complete"),
        ("auto", True, "Let me look.\n" + HERMES_CALL, "complete"),
        ("auto", True, HERMES_CALL + "\n" + HERMES_NOW, "complete"),
        ("auto", False, HERMES_CALL + "\n" + HERMES_NOW, "refused"),
        ("auto", True, '<tool_call>\n{"name": "delete_all", "arguments": {}}', "refused"),
        ("auto", True, HERMES_CALL.replace('"Paris"', "7"), "refused"),
        ("auto", True, HERMES_CALL[:40], "open"),
        ("required", True, "It is sunny.", "refused"),
        ("required", True, HERMES_CALL + "\n" + HERMES_NOW, "complete"),
        ("required", False, HERMES_CALL, "complete"),
        ("now", True, HERMES_CALL, "refused"),
        ("now", True, HERMES_NOW, "complete"),
    ],
)
def test_hermes_grammar_allows_what_the_choice_permits(grammars, choice, parallel, text, expected):
    assert verdict(grammars, Hermes(), choice, parallel, text) == expected


@pytest.mark.parametrize(
    "choice, parallel, text, expected",
    [
        ("auto", True, "It is sunny.", "complete"),
        ("auto", True, LLAMA_CALL + "; " + LLAMA_NOW, "complete"),
        ("auto", False, LLAMA_CALL + "; " + LLAMA_NOW, "refused"),
        ("auto", True, '{"name": "rm", "parameters": {}}', "refused"),
        ("required", True, "Sure", "refused"),
        ("required", True, LLAMA_CALL, "complete"),
        ("now", False, LLAMA_CALL, "refused"),
    ],
)
def test_llama3_json_grammar_allows_what_the_choice_permits(grammars, choice, parallel, text, expected):
    assert verdict(grammars, Llama3Json(), choice, parallel, text) == expected


def read(fmt: ToolFormat, text: str, pieces: list[str] | None = None) -> tuple[str, list[tuple[str, dict]]]:
    stream = ToolStream(fmt, FUNCTIONS)
    pieces = pieces if pieces is not None else [text]
    content, calls = "", []
    for i, piece in enumerate(pieces):
        shown, made = stream.feed(piece, final=i == len(pieces) - 1)
        content += shown
        calls += [(call.name, json.loads(call.arguments)) for call in made]
    return content, calls


@pytest.mark.parametrize(
    "fmt, text, content, names",
    [
        (Hermes(), "Let me look.\n" + HERMES_CALL + "\n" + HERMES_NOW, "Let me look.\n", ["get_weather", "now"]),
        (Hermes(), "a <tool> is not a call, <tool_call", "a <tool> is not a call, <tool_call", []),
        (Hermes(), '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>', None, []),  # not offered: text
        (Hermes(), HERMES_CALL[: -len("</tool_call>")], "", ["get_weather"]),  # unclosed at the end
        (Llama3Json(), LLAMA_CALL + "; " + LLAMA_NOW, "", ["get_weather", "now"]),
        (Llama3Json(), "<|python_tag|>" + LLAMA_NOW, "", ["now"]),
        (Llama3Json(), "  The answer is {1}.", "  The answer is {1}.", []),
        (Llama3Json(), '{"broken": ', '{"broken": ', []),
    ],
)
def test_calls_are_read_the_same_whole_and_token_by_token(fmt, text, content, names):
    whole = read(fmt, text)
    by_char = read(fmt, text, list(text))
    assert whole == by_char
    assert whole[0] == (text if content is None else content)
    assert [name for name, _ in whole[1]] == names


def test_a_stream_shows_text_at_once_and_a_call_when_it_is_complete():
    stream = ToolStream(Hermes(), FUNCTIONS)
    assert stream.feed("Hello <") == ("Hello ", [])  # "<" may open a call: held back
    assert stream.feed("b") == ("<b", [])
    assert stream.feed(HERMES_CALL[:-3]) == ("", [])
    content, calls = stream.feed(HERMES_CALL[-3:])
    assert content == "" and [c.name for c in calls] == ["get_weather"]
    assert calls[0].id.startswith("call_")


def test_one_call_kept_where_parallel_calls_are_off():
    stream = ToolStream(Hermes(), FUNCTIONS, parallel=False)
    content, calls = stream.feed(HERMES_CALL + "\n" + HERMES_NOW, final=True)
    assert [c.name for c in calls] == ["get_weather"]


def test_the_format_is_read_from_the_template_or_named():
    assert isinstance(ToolFormat.for_template("{{ '<tool_call>' }}{% if tools %}{% endif %}"), Hermes)
    assert isinstance(ToolFormat.for_template('<|python_tag|>{"name": ..., "parameters": ...}{{ tools }}'), Llama3Json)
    assert isinstance(ToolFormat.for_template(CHAT_TEMPLATE), Hermes)
    assert isinstance(ToolFormat.named("llama3_json"), Llama3Json)
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        ToolFormat.named("mistral")


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "now", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "a", "content": "sunny"},
    {"role": "tool", "tool_call_id": "b", "content": "noon"},
]


def test_a_template_without_tools_gets_them_written_out():
    tokenizer = tiny_tokenizer()
    messages, extra = conversation(HISTORY, FUNCTIONS, Hermes(), CHAT_TEMPLATE)
    assert extra == {}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == HERMES_CALL + "\n" + HERMES_NOW
    assert messages[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    text = tokenizer.apply_chat_template(messages)
    assert "<tools>" in text and text.endswith("<|im_start|>assistant\n")
    assert conversation(HISTORY[:2], [], Hermes(), CHAT_TEMPLATE)[0] == HISTORY[:2]  # no tools offered


TOOLS_TEMPLATE = (
    "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<{{ c.function.name }} {{ c.function.arguments.city }}>{% endfor %}"
    "{% endfor %}"
)


def test_a_template_that_knows_tools_gets_them_and_arguments_as_objects():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    messages, extra = conversation(HISTORY, FUNCTIONS, Hermes(), TOOLS_TEMPLATE)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **extra)
    assert text.startswith("[get_weather][now]system:Be brief.")
    assert "<get_weather Paris><now >" in text and "tool:sunny" in text


def test_qwen_2_5s_own_template_renders_tools_calls_and_results():
    """Qwen2.5-Instruct's chat template (tests/data/templates, Apache-2.0, as Qwen publishes it)."""
    template = (Path(__file__).parents[1] / "data" / "templates" / "qwen2.5-instruct.jinja").read_text()
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    fmt = ToolFormat.for_template(template)
    assert isinstance(fmt, Hermes)
    messages, extra = conversation(HISTORY, FUNCTIONS, fmt, template)
    text = tokenizer.apply_chat_template(messages, **extra)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(WEATHER.spec()) in text
    assert HERMES_CALL + "\n" + HERMES_NOW + "<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon" in text
