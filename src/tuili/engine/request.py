"""A request's life in the engine: its tokens, its KV blocks, its text so far, and what it reports."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tuili.engine.blocks import BlockTable
from tuili.engine.detokenize import OutputText
from tuili.engine.sampling import SamplingParams, TokenLogprob
from tuili.engine.structured import Guide


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    text: OutputText
    generator: torch.Generator
    arrival: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or "queue_timeout"
    error: str | None = None  # with finish_reason "error": what failed in this request's own work
    table: BlockTable | None = None  # its KV blocks while it holds any
    num_computed: int = 0  # leading tokens whose keys and values are in the cache
    num_cached: int = 0  # prompt tokens found in the prefix cache at admission
    block_keys: list[int] = field(default_factory=list)  # prefix-cache keys of its full computed blocks
    scheduled_time: float | None = None  # first admitted to the running batch (queue time ends)
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    guide: Guide | None = None  # with SamplingParams(structured_outputs=...): its place in the grammar
    draft: Any = None  # a speculative step's proposed tokens (tuili.engine.speculative.Draft), while it runs
    accepting: float = 1.0  # the recent share of its drafts the model accepted (a moving average)

    def __post_init__(self):
        self.all_ids = list(self.prompt_ids)  # prompt, then output: what the cache must hold

    def append(self, token: int, logprob: TokenLogprob | None) -> tuple[str, str | None]:
        """Add a generated token: the text it releases, and why the request ends with it (a stop,
        its grammar complete, max_tokens; None: it goes on)."""
        if self.guide is not None:
            self.guide.accept(token)
        self.output_ids.append(token)
        self.all_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        delta = self.text.add(token)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if self.text.finish_reason is not None:
            return delta, self.text.finish_reason
        if self.guide is not None and self.guide.done:  # nothing may follow a complete grammar
            return delta + self.text.finish(), "stop"
        if len(self.output_ids) >= self.params.max_tokens:
            return delta + self.text.finish(), "length"
        return delta, None

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next one can be sampled."""
        return len(self.all_ids) - self.num_computed


@dataclass
class RequestOutput:
    """What one engine step changed for one request (a streaming delta and the totals so far)."""

    request_id: str
    delta: str  # text released by this step
    new_token_ids: list[int]
    text: str  # everything released so far
    token_ids: list[int]
    prompt_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    new_logprobs: list[TokenLogprob]  # with SamplingParams(logprobs=n): this step's
    logprobs: list[TokenLogprob]  # and all so far
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    arrival_time: float  # perf_counter clock
    scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    error: str | None = None  # with finish_reason "error" or "queue_timeout": what happened to it

    @classmethod
    def of(cls, request: Request, delta: str, new_tokens: int) -> RequestOutput:
        logprobs = request.logprobs
        return cls(
            request.id,
            delta,
            request.output_ids[len(request.output_ids) - new_tokens :],
            request.text.text,
            list(request.output_ids),
            request.prompt_ids,
            request.status is Status.FINISHED,
            request.finish_reason,
            logprobs[len(logprobs) - new_tokens :] if logprobs else [],
            list(logprobs),
            request.num_cached,
            request.arrival,
            request.scheduled_time,
            request.first_token_time,
            request.finished_time,
            request.error,
        )
