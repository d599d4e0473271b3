"""Tool calls: how a model family writes them (its format), the prompt that offers a chat template the
tools, the grammar that keeps every call well-formed, and the parser that reads calls back out of
the text, all at once or as a stream.

Two formats, named as vLLM's `--tool-call-parser` names them: `hermes` (Hermes, Qwen 2.5/3 and
most fine-tunes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) and `llama3_json`
(Llama 3.1-3.3: a bare `{"name": ..., "parameters": {...}}`, several joined by "; "). A format
registers itself by subclassing `ToolFormat`.

Every mode is constrained, `auto` included: the grammar lets the model write free text or calls,
and once it opens a call, the call must name an offered function with arguments that follow its
schema. So calls always parse; vLLM constrains only `required` and named choices. A chat template
that does not know tools (no `tools` in its source) gets them the way Hermes does: a system
message that lists them, tool calls written into assistant turns, tool results as user turns.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tuili.engine.structured import JSON_OPTIONS, StructuredOutputsParams

NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
Choice = str  # "auto", "required", or the name of the one function to call


@dataclass(frozen=True)
class Function:
    """A tool the model may call: its name, what it does, and the JSON schema of its arguments."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    def spec(self) -> dict[str, Any]:
        """OpenAI's tool object, as chat templates read it (with a description always: some templates,
        Hermes 3's among them, fail on a tool without one)."""
        function = {"name": self.name, "description": self.description or "", "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: `arguments` is JSON text, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolFormat(ABC):
    """How one family of models writes tool calls. Subclasses set `name`, `arguments_key` and the
    text around calls, and register themselves."""

    name: ClassVar[str]
    arguments_key: ClassVar[str] = "arguments"
    formats: ClassVar[dict[str, type[ToolFormat]]] = {}

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        ToolFormat.formats[cls.name] = cls

    @classmethod
    def named(cls, name: str) -> ToolFormat:
        if name not in cls.formats:
            raise ValueError(f"unknown tool-call format {name!r}; tuili has {', '.join(sorted(cls.formats))}")
        return cls.formats[name]()

    @classmethod
    def for_template(cls, template: str | None) -> ToolFormat:
        """The format a chat template writes calls in; Hermes for templates that do not say."""
        if template and "<tool_call>" not in template and ("<|python_tag|>" in template or '"parameters"' in template):
            return Llama3Json()
        return Hermes()

    # ---- the grammar ---------------------------------------------------------------------------
    def call_schema(self, functions: Sequence[Function]) -> dict[str, Any]:
        """The JSON schema of one call to any of `functions`."""
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, self.arguments_key: f.parameters},
                "required": ["name", self.arguments_key],
                "additionalProperties": False,
            }
            for f in functions
        ]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {**schema, "x-guidance": JSON_OPTIONS}

    def constraint(self, functions: Sequence[Function], choice: Choice, parallel: bool) -> StructuredOutputsParams:
        """The grammar for a request: free text or calls (`auto`), at least one call (`required`), or
        one call to the named function; one call at most unless `parallel`."""
        if choice not in ("auto", "required"):
            functions = [f for f in functions if f.name == choice]
        obj = f"obj: %json {json.dumps(self.call_schema(functions), ensure_ascii=False)}"
        parallel = parallel and choice in ("auto", "required")
        return StructuredOutputsParams(grammar=self.grammar(choice == "auto", parallel, obj))

    @abstractmethod
    def grammar(self, free: bool, parallel: bool, obj: str) -> str:
        """The Lark grammar: free text first where `free`, then calls (more than one where
        `parallel`), each call's JSON the rule `obj`."""

    # ---- reading calls back ----------------------------------------------------------------------
    @abstractmethod
    def start(self, text: str, at_start: bool) -> int | None:
        """Where the calls begin in `text` (None: not yet); `at_start`: nothing was shown before it."""

    @abstractmethod
    def held(self, text: str, at_start: bool) -> int:
        """How many characters at the end of `text` might be the beginning of a call (not shown yet)."""

    @abstractmethod
    def objects(self, region: str, final: bool) -> list[tuple[Any, int]]:
        """The call objects complete in `region` (text from where the calls begin), each with where
        its text ends; None for one that is not JSON. `final`: the text has ended (an unclosed
        last call counts)."""

    # ---- templates that do not know tools ------------------------------------------------------------
    def system_prompt(self, functions: Sequence[Function]) -> str:
        listed = "\n".join(json.dumps(f.spec(), ensure_ascii=False) for f in functions)
        example = json.dumps({"name": "<function-name>", self.arguments_key: "<args-dict>"})
        return (
            "You are a function calling AI model. You are provided with function signatures within "
            "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
            "Don't make assumptions about what values to plug into functions. Here are the available tools: "
            f"<tools>\n{listed}\n</tools>\nFor each function call return a json object with function name "
            f"and arguments within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n{example}\n</tool_call>"
        )

    def written(self, name: str, arguments: dict[str, Any]) -> str:
        """A call as the model would write it (assistant turns of templates that do not know tools)."""
        call = json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)
        return f"<tool_call>\n{call}\n</tool_call>"


class Hermes(ToolFormat):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, after text or none."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def grammar(self, free: bool, parallel: bool, obj: str) -> str:
        more = '\nmore: "\\n" "<tool_call>" body' if parallel else ""
        first = "pre body" if free else '"<tool_call>" body'
        start = f"start: {'FREE | ' if free else ''}{first}{' more*' if parallel else ''}"
        return "\n".join(
            [
                start,
                "FREE: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/",
                'pre[stop="<tool_call>"]: /(?s:.*)/',
                'body: "\\n" obj "\\n</tool_call>"' + more,
                obj,
            ]
        )

    def start(self, text: str, at_start: bool) -> int | None:
        at = text.find(self.OPEN)
        return None if at < 0 else at

    def held(self, text: str, at_start: bool) -> int:
        return next((n for n in range(min(len(text), len(self.OPEN) - 1), 0, -1) if self.OPEN.startswith(text[-n:])), 0)

    def objects(self, region: str, final: bool) -> list[tuple[Any, int]]:
        found: list[tuple[Any, int]] = []
        end = 0
        for match in self._CALL.finditer(region):
            found.append((_json(match.group(1)), match.end()))
            end = match.end()
        tail = region[end:].strip()
        if final and tail.startswith(self.OPEN):  # an unclosed last call: its JSON may still be whole
            found.append((_json(tail[len(self.OPEN) :].strip()), len(region)))
        return found


class Llama3Json(ToolFormat):
    """Llama 3.1-3.3's custom tools: the reply is `{"name": ..., "parameters": {...}}` and nothing else,
    several joined by "; " (an optional `<|python_tag|>` first)."""

    name = "llama3_json"
    arguments_key = "parameters"
    TAG = "<|python_tag|>"

    def grammar(self, free: bool, parallel: bool, obj: str) -> str:
        calls = 'obj ("; " obj)*' if parallel else "obj"
        start = f"start: FREE | {calls}" if free else f"start: {calls}"
        return "\n".join([start, r"FREE: /(?s:\s*([^\s{].*)?)/", obj])

    def start(self, text: str, at_start: bool) -> int | None:
        body = text.lstrip()
        if at_start and (body.startswith("{") or body.startswith(self.TAG)):
            return len(text) - len(body)
        return None

    def held(self, text: str, at_start: bool) -> int:
        body = text.lstrip()
        return len(text) if at_start and (not body or self.TAG.startswith(body)) else 0

    def objects(self, region: str, final: bool) -> list[tuple[Any, int]]:
        decoder, at = json.JSONDecoder(), 0
        found: list[tuple[Any, int]] = []
        while True:
            while at < len(region) and region[at] in " \t\n;":
                at += 1
            if region.startswith(self.TAG, at):
                at += len(self.TAG)
                continue
            if at >= len(region):
                return found
            try:
                obj, at = decoder.raw_decode(region, at)
            except json.JSONDecodeError:
                return [*found, (None, len(region))] if final else found
            found.append((obj, at))

    def system_prompt(self, functions: Sequence[Function]) -> str:
        listed = "\n\n".join(json.dumps(f.spec(), indent=4, ensure_ascii=False) for f in functions)
        return (
            "Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\nRespond in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}. '
            f"Do not use variables.\n\n{listed}"
        )

    def written(self, name: str, arguments: dict[str, Any]) -> str:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


class ToolStream:
    """Splits one choice's text, delta by delta, into what it says (content) and the calls it makes.
    Text that may open a call is held back until it does or cannot; a call is given whole once
    complete. A call that does not parse, or names no offered function, is shown as text."""

    def __init__(self, fmt: ToolFormat, functions: Sequence[Function], parallel: bool = True):
        self.fmt, self.names, self.parallel = fmt, {f.name for f in functions}, parallel
        self.pending = ""  # text not shown yet: a possible opening, or the calls region
        self.shown = False  # content was shown (some formats open calls only at the start)
        self.in_calls = False
        self.calls: list[ToolCall] = []

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """(content to show, calls completed) after `delta`; `final`: the text ends here."""
        self.pending += delta
        content = ""
        if not self.in_calls:
            at = self.fmt.start(self.pending, not self.shown)
            if at is None:
                keep = 0 if final else self.fmt.held(self.pending, not self.shown)
                cut = len(self.pending) - keep
                content, self.pending = self.pending[:cut], self.pending[cut:]
                self.shown = self.shown or bool(content)
                return content, []
            content, self.pending, self.in_calls = self.pending[:at], self.pending[at:], True
        new, used = [], 0
        for obj, end in self.fmt.objects(self.pending, final):
            call = self._call(obj)
            if call is None:  # not a call after all: its text is shown
                content += self.pending[used:end]
            elif self.parallel or not self.calls:
                new.append(call)
                self.calls.append(call)
            used = end
        self.pending = self.pending[used:]
        if final and self.pending.strip():
            content += self.pending
        return content, new

    def _call(self, obj: Any) -> ToolCall | None:
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None
        arguments = obj.get(self.fmt.arguments_key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(arguments, str):
            arguments = _json(arguments)
        if not isinstance(arguments, dict):
            return None
        return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def conversation(
    messages: list[dict[str, Any]], functions: Sequence[Function], fmt: ToolFormat, template: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and the template's extra variables for a chat with tools. A template that knows
    tools gets them (`tools=`) with each call's arguments as a dict, as Hugging Face templates read
    them; one that does not gets the format's system prompt and everything written out as text."""
    if template and "tools" in template:
        rendered = [_arguments_as_dicts(m) for m in messages]
        return rendered, ({"tools": [f.spec() for f in functions]} if functions else {})
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "tool":
            response = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_results": True})
        elif message.get("tool_calls"):
            called = [call["function"] for call in message["tool_calls"]]
            calls = [fmt.written(f["name"], _loads(f["arguments"])) for f in called]
            text = "\n".join([message.get("content") or "", *calls]).strip()
            out.append({"role": message["role"], "content": text})
        else:
            out.append(dict(message))
    out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
    if functions:
        prompt = fmt.system_prompt(functions)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _arguments_as_dicts(message: dict[str, Any]) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return message
    calls = [
        {**c, "function": {**c["function"], "arguments": _loads(c["function"]["arguments"])}}
        for c in message["tool_calls"]
    ]
    return {**message, "tool_calls": calls}


def _loads(arguments: str | dict[str, Any]) -> dict[str, Any]:
    return arguments if isinstance(arguments, dict) else (_json(arguments) or {})
