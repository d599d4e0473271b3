"""Every check a request passes before it reaches the engine, in one place: readiness, the model's
name, token ids in the vocabulary, the chat template, the context, the server's limits and its queue.
Each failure is an `APIError` (4xx, or 503 while the engine cannot serve) that says what to change."""

from __future__ import annotations

from typing import Any

from tuili.engine.async_llm import AsyncLLM
from tuili.engine.sampling import SamplingParams
from tuili.errors import TuiliError
from tuili.server.config import ServerConfig
from tuili.server.errors import APIError
from tuili.server.protocol import EmbeddingRequest, LoglikelihoodRequest, _Sampling

Job = tuple[int, list[int], SamplingParams]  # (choice index, prompt ids, the choice's parameters)


class Limits:
    def __init__(self, config: ServerConfig, llm: AsyncLLM):
        self.config, self.llm, self.model = config, llm, llm.model
        self.tokenizer = llm.model.tokenizer
        self.context = config.context(llm.model.config.max_position_embeddings)

    def serving(self, model: str | None, ready: bool) -> None:
        """The engine runs, warm-up is done, and `model` is a name this server answers to."""
        if not self.llm.alive:
            raise APIError(503, f"the engine has stopped ({self.llm.error}); restart the server")
        if not ready:
            raise APIError(
                503, "the server is warming up; retry in a moment (GET /ready says when)", headers={"Retry-After": "1"}
            )
        self.model_name(model)

    def model_name(self, model: str | None) -> None:
        if model is not None and model not in self.config.model_names:
            raise APIError(
                404,
                f"the model {model!r} does not exist here; this server serves "
                f"{self.config.model_names[0]!r} (GET /v1/models)",
                "model",
                "model_not_found",
            )

    # ---- tokens ----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], param: str, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = self.in_vocabulary(list(prompt), param)
        if not ids:
            raise APIError(400, f"{param} is empty: give at least one token of text", param)
        return ids

    def in_vocabulary(self, ids: list[int], param: str) -> list[int]:
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must be in [0, {vocab}), the model's vocabulary", param)
        return ids

    def render_chat(self, messages: list[dict[str, Any]], generation: bool = True, **extra: Any) -> list[int]:
        """The conversation's prompt ids (`extra`: the template's other variables, such as tools)."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation, **extra)
            return self.tokenizer.encode(text, add_special_tokens=False)
        except (TuiliError, ValueError) as e:
            raise APIError(
                400, f"the messages could not be rendered with the model's chat template: {e}", "messages"
            ) from None

    # ---- generation ------------------------------------------------------------------------
    def jobs(
        self, body: _Sampling, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None, in_flight: int
    ) -> list[Job]:
        """Check every limit, then one (choice index, prompt ids, params) per prompt × n."""
        limit = self.config.max_tokens or self.context
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens ({max_tokens}) exceeds this server's limit of {limit}", "max_tokens")
        if body.structured is not None:
            field, constraint = body.structured
            try:
                self.llm.engine.grammars.compile(constraint)
            except ValueError as e:
                raise APIError(400, str(e), field) from None
        jobs = []
        for i, ids in enumerate(prompts):
            self.prompt_fits(ids)
            wanted = max_tokens if max_tokens is not None else min(limit, self.context - len(ids))
            if len(ids) + wanted > self.context:
                raise APIError(
                    400,
                    f"prompt ({len(ids)} tokens) + max_tokens ({wanted}) exceeds the {self.context}-token "
                    "context this server serves: ask for fewer tokens",
                    "max_tokens",
                )
            for j in range(body.n):
                try:
                    params = body.sampling_params(wanted, logprobs, j)
                    self.llm.engine.validate(ids, params)
                except ValueError as e:
                    raise APIError(400, str(e), "max_tokens" if "max_tokens" in str(e) else None) from None
                jobs.append((i * body.n + j, ids, params))
        if in_flight + len(jobs) > self.config.max_queued_requests:
            raise APIError(
                429,
                f"the server is busy ({in_flight} sequences running or queued, limit "
                f"{self.config.max_queued_requests}); retry after a second",
                headers={"Retry-After": "1"},
            )
        return jobs

    def prompt_fits(self, ids: list[int]) -> None:
        if self.config.max_prompt_tokens and len(ids) > self.config.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens, over this server's limit of {self.config.max_prompt_tokens}",
                "prompt",
            )
        if len(ids) >= self.context:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; the model's context is {self.context} "
                "tokens, and the completion needs room too: shorten the prompt",
                "prompt",
            )

    # ---- one forward pass: embeddings and scores -------------------------------------------
    def embedding_inputs(self, body: EmbeddingRequest) -> list[list[int]]:
        try:
            inputs = [self.encode(x, "input") for x in body.inputs()]
        except ValueError as e:
            raise APIError(400, str(e), "input") from None
        hidden = self.model.config.hidden_size
        if body.dimensions is not None and body.dimensions != hidden:
            raise APIError(
                400, f"this model's embeddings have {hidden} dimensions; it cannot give {body.dimensions}", "dimensions"
            )
        for ids in inputs:
            if len(ids) > self.context:
                raise APIError(400, f"an input has {len(ids)} tokens; the model's context is {self.context}", "input")
        return inputs

    def score_items(self, body: LoglikelihoodRequest) -> list[tuple[list[int], list[int], int]]:
        """(context ids, continuation ids, top_logprobs) per pair."""
        try:
            pairs = body.pairs()
        except ValueError as e:
            raise APIError(400, str(e), "input") from None
        items = []
        for pair in pairs:
            context = self.tokenizer.encode(pair.context)
            continuation = self.tokenizer.encode(pair.continuation, add_special_tokens=False)
            if not context:
                raise APIError(
                    400,
                    "a context is empty and this tokenizer adds no BOS token: there is nothing to "
                    "predict the continuation from",
                    "input",
                )
            if not continuation:
                raise APIError(400, "a continuation has no tokens", "input")
            if len(context) + len(continuation) > self.context:
                raise APIError(
                    400,
                    f"a context and continuation have {len(context) + len(continuation)} tokens; "
                    f"the model's context is {self.context}",
                    "input",
                )
            items.append((context, continuation, body.top_logprobs))
        return items
