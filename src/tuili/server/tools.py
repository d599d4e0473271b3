"""What OpenAI chat requests say about tools: the functions offered (`tools`), which may be called
(`tool_choice`, `parallel_tool_calls`), and the calls and results already in the history; read
into `tuili.engine.tools`' terms."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuili.engine.tools import Function
from tuili.server.errors import FieldError

_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionDefinition(BaseModel):
    """A function the model may call. `strict` is accepted either way: tuili's calls always follow
    the schema (the grammar enforces it in every `tool_choice` mode)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`: call this function."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallEntry(BaseModel):
    """A call an assistant turn of the history made."""

    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ToolUse:
    """A chat request's tools: the functions, and "auto", "required" or a function's name (None:
    tools are offered to no one: `tool_choice: "none"`, or no tools)."""

    def __init__(self, tools: list[ToolDefinition] | None, choice: Any, parallel: bool):
        self.functions = [
            Function(t.function.name, t.function.description, t.function.parameters or {"type": "object"})
            for t in tools or ()
        ]
        names = [f.name for f in self.functions]
        if len(set(names)) != len(names):
            raise FieldError("tools", "two tools have the same name; give each function a distinct name")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise FieldError(
                    "tool_choice", f"tool_choice names {choice.function.name!r}, which is not among the tools"
                )
            choice = choice.function.name
        if choice in ("auto", "required") and not self.functions:
            raise FieldError("tool_choice", f"tool_choice {choice!r} needs tools; give tools or remove tool_choice")
        self.choice: str | None = None if choice == "none" or not self.functions else (choice or "auto")
        self.parallel = parallel

    def check_alone(self, structured: tuple[str, Any] | None) -> None:
        """Tool calls shape the reply with a grammar: another constraint cannot shape it too."""
        if self.choice is not None and structured is not None:
            raise FieldError(
                structured[0],
                f'{structured[0]} and tool calls cannot both shape the reply; drop one, or send tool_choice: "none"',
            )

    @property
    def offered(self) -> list[Function]:
        """The functions the chat template is told of (none with `tool_choice: "none"`)."""
        return self.functions if self.choice else []


def history_checked(data: Any) -> Any:
    """A history message's tool fields where they belong: tool results (`role: "tool"`) answer a
    call by `tool_call_id`, and only assistant turns make calls. The legacy `function_call` is refused."""
    if not isinstance(data, dict):
        return data
    if "function_call" in data or data.get("role") == "function":
        raise ValueError("function_call and role 'function' are the legacy API; send tool_calls and role 'tool'")
    if data.get("role") == "tool" and not data.get("tool_call_id"):
        raise ValueError("a message with role 'tool' needs tool_call_id (the id of the call it answers)")
    if data.get("role") != "tool" and "tool_call_id" in data:
        raise ValueError("tool_call_id belongs to messages with role 'tool'")
    if data.get("tool_calls") is not None and data.get("role") != "assistant":
        raise ValueError("tool_calls belong to messages with role 'assistant'")
    return data
