"""`ServerConfig`: what an operator sets for `tuili serve` (names, limits, batching, time limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """model_names: the names clients may send as `model` (the first is the one /v1/models lists).
    max_prompt_tokens, max_tokens: per-request limits (default: the model's context).
    max_queued_requests: generations running or waiting at once; beyond it, 429 with Retry-After.
    embed_batch_size, embed_max_wait: the dynamic batcher of /v1/embeddings and /v1/loglikelihood.
    request_timeout: seconds a generation may run; past it its sequences are aborted and the client gets
    504 (or, streaming, an error event), so work nobody waits for ends (None: no limit)."""

    model_names: tuple[str, ...] = ("default",)
    api_key: str | None = None
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    max_body_bytes: int = 4 << 20
    max_queued_requests: int = 256
    embed_batch_size: int = 32
    embed_max_wait: float = 0.005
    embed_batch_tokens: int = 16384
    request_timeout: float | None = 600.0
    warmup: bool = True
    max_model_len: int | None = None  # the longest prompt + completion served (None: the model's context)
    cors: dict | None = None  # CORSMiddleware's options (allow_origins, ...), or None: no CORS
    metrics_names: str = "tuili"  # "vllm": /metrics under vLLM's names, with a model_name label
    tool_call_parser: str | None = None  # how the model writes tool calls (None: read from its chat template)

    def context(self, model_context: int) -> int:
        """The tokens a request may span: the model's context, or less with max_model_len."""
        return min(model_context, self.max_model_len or model_context)

    def timeout_message(self) -> str:
        return (
            f"the request ran past this server's time limit of {self.request_timeout:g} s and was "
            "stopped; ask for fewer tokens (max_tokens), or start the server with a larger --request-timeout"
        )
