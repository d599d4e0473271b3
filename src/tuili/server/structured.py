"""What OpenAI and vLLM requests say about structured output: `response_format`, the `guided_*` fields
and the `structured_outputs` object, read into one `StructuredOutputsParams`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuili.engine.structured import StructuredOutputsParams
from tuili.server.errors import FieldError


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's named schema (`strict` or not, the output follows it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON that follows a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type 'json_schema', and only then")
        return self


class StructuredOutputsBody(BaseModel):
    """vLLM's `structured_outputs` object: exactly one of json, json_object, regex, choice, grammar."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    whitespace_pattern: str | None = None


GUIDED_BACKENDS = ("auto", "guidance", "llguidance")  # what guided_decoding_backend may name


def structured_outputs(body: Any) -> tuple[str, StructuredOutputsParams] | None:
    """A completions or chat request's one structured-output constraint and the field that gave it
    (None if it asks for none); FieldError, naming the field, where they conflict or are malformed
    (whether a grammar compiles is the engine's check)."""
    guided = {k: getattr(body, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")}
    guided = {k: v for k, v in guided.items() if v is not None}
    fmt = body.response_format if body.response_format and body.response_format.type != "text" else None
    sources = {"response_format": fmt, **{f"guided_{k}": v for k, v in guided.items()}}
    sources["structured_outputs"] = body.structured_outputs
    given = [name for name, value in sources.items() if value is not None]
    if len(given) > 1:
        raise FieldError(given[1], f"give one structured-output constraint, not {' and '.join(given)}")
    backend = body.guided_decoding_backend
    if backend is not None and backend not in GUIDED_BACKENDS:
        raise FieldError(
            "guided_decoding_backend",
            f"this server's structured output is llguidance ('guidance'), not {backend!r}; "
            "remove the field or name 'guidance'",
        )
    if body.guided_whitespace_pattern is not None and "guided_json" not in given:
        raise FieldError("guided_whitespace_pattern", "guided_whitespace_pattern applies to guided_json only")
    if not given:
        return None
    try:
        if fmt is not None:
            schema = fmt.json_schema.schema_ if fmt.json_schema else None
            return given[0], StructuredOutputsParams(json=schema, json_object=schema is None)
        if guided:
            return given[0], StructuredOutputsParams(**guided, whitespace_pattern=body.guided_whitespace_pattern)
        return given[0], StructuredOutputsParams(**body.structured_outputs.model_dump(by_alias=True))
    except ValueError as e:
        raise FieldError(given[0], str(e)) from None
