"""The OpenAI request schemas tuili serves (pydantic), and how each maps to `SamplingParams`.

Fields follow the OpenAI API reference; `top_k`, `min_p`, `repetition_penalty`, `ignore_eos` and
`stop_token_ids` are extensions vLLM also accepts. NaN, infinities and text that is not valid Unicode
(a lone surrogate such as "\\ud800") are refused, naming the field.

Structured output comes three ways, one at most a request: OpenAI's `response_format` (`json_object`,
`json_schema`), vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, and current
vLLM's `structured_outputs` object; each becomes one `StructuredOutputsParams`.

Unknown fields, one policy: a field tuili does not know could change the answer (the legacy
`functions`, a newer vLLM extension), so it is refused with 400, never ignored. Only pure bookkeeping fields
(`IGNORABLE`: they change nothing a model computes) are accepted and ignored; the response names
them in its `X-Tuili-Ignored-Fields` header and the server logs them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tuili.engine.sampling import SEED_RANGE, SamplingParams, wrap_seed
from tuili.engine.structured import StructuredOutputsParams
from tuili.server.errors import FieldError
from tuili.server.structured import ResponseFormat, StructuredOutputsBody, structured_outputs
from tuili.server.tools import NamedToolChoice, ToolCallEntry, ToolDefinition, ToolUse, history_checked

NonNegInt = Annotated[int, Field(ge=0)]
IGNORABLE = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
# fields clients send that tuili cannot honour, with what each asks for
_UNSUPPORTED = {
    "functions": "the legacy functions API is not supported (send tools)",
    "function_call": "the legacy function_call is not supported (send tool_choice)",
}


def invalid_text(value: Any, path: tuple = ()) -> tuple[tuple, str] | None:
    """The location and a description of the first string in a JSON value that is not valid Unicode
    (a lone surrogate, which JSON's \\u escapes can carry and no tokenizer can encode), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, f"invalid Unicode: a lone surrogate (\\u{ord(value[e.start]):04x}) at character {e.start}"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = invalid_text(key, path) or invalid_text(item, (*path, key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = invalid_text(item, (*path, i))
            if found:
                return found
    return None


class _Request(BaseModel):
    """A request body: unknown fields refused (the schema says so: additionalProperties false), the
    IGNORABLE bookkeeping fields accepted and ignored, every string valid Unicode."""

    # extra="allow" so that `_known_fields` can say why a field is refused; the schema forbids them
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, json_schema_extra={"additionalProperties": False})
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        found = invalid_text(data)
        if found:
            path, problem = found
            field = ".".join(map(str, path)) or "the body"
            raise FieldError(str(path[0]) if path else None, f"{field}: {problem}; send text as valid UTF-8")
        return data

    @model_validator(mode="after")
    def _known_fields(self):
        for name in sorted(self.model_extra or ()):
            if name in _UNSUPPORTED:
                raise FieldError(name, f"{_UNSUPPORTED[name]} by this server; remove the field")
            raise FieldError(
                name,
                f"unknown field; tuili refuses fields it cannot honour rather than "
                f"ignore them (only {', '.join(sorted(IGNORABLE))} are ignored)",
            )
        return self

    @property
    def ignored_fields(self) -> list[str]:
        """The bookkeeping fields this request sent that tuili ignores."""
        return sorted(IGNORABLE & self.model_fields_set)


class StreamOptions(BaseModel):
    """OpenAI's `include_usage` (a usage chunk before [DONE]) and vLLM's `continuous_usage_stats`
    (besides it, every chunk carries its choice's usage so far: what guidellm sends)."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False

    @model_validator(mode="after")
    def _continuous_needs_usage(self):
        if self.continuous_usage_stats and not self.include_usage:
            raise ValueError("continuous_usage_stats needs include_usage: true (usage is sent only with it)")
        return self


class _Sampling(_Request):
    """Sampling fields shared by completions and chat completions."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # extensions (vLLM's names)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    ignore_eos: bool = False
    stop_token_ids: list[NonNegInt] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (as text) -> bias
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's: each prompt token's, with n alternatives
    # structured output: OpenAI's, vLLM's older fields, vLLM's current object
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None
    structured_outputs: StructuredOutputsBody | None = None
    _structured: tuple[str, StructuredOutputsParams] | None = None  # (field, constraint) the fields above give

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias and not all(token.isascii() and token.isdigit() for token in bias):
            raise ValueError('keys must be token ids, such as "50256"')
        if bias and len(bias) > 300:
            raise ValueError("at most 300 tokens (OpenAI's limit)")
        return bias

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stop

    @model_validator(mode="after")
    def _usage_needs_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.prompt_logprobs is not None and self.stream:
            raise FieldError("prompt_logprobs", "prompt_logprobs come in non-streaming responses; set stream: false")
        return self

    @model_validator(mode="after")
    def _one_constraint(self):
        self._structured = structured_outputs(self)
        return self

    def constrain(self, field: str, constraint: StructuredOutputsParams) -> None:
        """Shape the reply with `constraint`, which `field` asked for (the server's own, such as tools')."""
        assert self._structured is None, "one constraint a request"
        self._structured = (field, constraint)

    @property
    def structured(self) -> tuple[str, StructuredOutputsParams] | None:
        """The structured-output constraint asked for, with the field that asked (None: free text)."""
        return self._structured

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def sampling_params(self, max_tokens: int, logprobs: int | None, index: int = 0) -> SamplingParams:
        """The engine's parameters for choice `index` (choices of one request get seeds seed + index)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else wrap_seed(self.seed + index),
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            structured_outputs=self._structured[1] if self._structured else None,
            logit_bias=self._logit_bias(),
        )

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's logit_bias, keyed by token id (JSON object keys are text)."""
        return {int(token): bias for token, bias in self.logit_bias.items()} if self.logit_bias else None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: the prompt's log-probabilities alone
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt comes back before the completion, with its log-probabilities
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _supported(self):
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens: 0 returns nothing without echo; ask for at least 1")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this model")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported: use n")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One prompt per entry: a string, a list of strings, token ids, or a list of token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValueError("prompt is empty: give text or token ids")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of the history: an assistant turn may carry the tool calls it made, and a
    `tool` message the result of one."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallEntry] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _tool_fields(cls, data: Any) -> Any:
        return history_checked(data)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """The message as the chat template reads it (developer messages are system messages)."""
    entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    entry["content"] = message.text()
    if message.name is not None:
        entry["name"] = message.name
    if message.tool_calls:
        entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    return entry


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    _tool_use: ToolUse | None = None

    @model_validator(mode="after")
    def _supported(self):
        self._tool_use = ToolUse(self.tools, self.tool_choice, self.parallel_tool_calls)
        self._tool_use.check_alone(self.structured)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def tool_use(self) -> ToolUse:
        assert self._tool_use is not None, "set when the request is validated"
        return self._tool_use

    def conversation(self) -> list[dict[str, Any]]:
        return [message_dict(m) for m in self.messages]


class EmbeddingRequest(_Request):
    """POST /v1/embeddings: mean-pooled, L2-normalised final hidden states."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    def inputs(self) -> list[str | list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if not self.input:
            raise ValueError("input is empty: give text or token ids")
        if isinstance(self.input[0], int):
            return [list(self.input)]
        return list(self.input)


class ScorePair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context: str
    continuation: str = Field(min_length=1)


class LoglikelihoodRequest(_Request):
    """POST /v1/loglikelihood: log P(continuation | context) per pair, as lm-evaluation-harness asks."""

    model: str
    input: ScorePair | list[ScorePair]
    top_logprobs: int = Field(0, ge=0, le=20)

    def pairs(self) -> list[ScorePair]:
        pairs = [self.input] if isinstance(self.input, ScorePair) else list(self.input)
        if not pairs:
            raise ValueError("input is empty: give at least one {context, continuation} pair")
        return pairs


class TokenizeRequest(_Request):
    """POST /tokenize: text, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = None  # rendered with the messages, as chat requests render them
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[NonNegInt]
