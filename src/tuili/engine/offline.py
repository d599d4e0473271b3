"""`LLM`: offline inference in vLLM's shape, so code written for vLLM's `LLM` runs unchanged.

    llm = LLM("default")
    outputs = llm.generate(["Hello", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(n=2, max_tokens=32))
    outputs[0].outputs[1].text, outputs[0].outputs[1].token_ids, outputs[0].outputs[1].finish_reason
    llm.chat([{"role": "user", "content": "Hi"}]), llm.embed(["a sentence"]), llm.get_tokenizer()

Everything runs on one `LLMEngine` (continuous batching over the paged KV cache): all prompts and
their `n` choices are batched together. Choice `j` of a prompt gets the seed `seed + j`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from tuili.engine.llm import LLMEngine
from tuili.engine.prompt import encode_prompt
from tuili.engine.request import RequestOutput
from tuili.engine.sampling import SamplingParams, wrap_seed
from tuili.errors import RequestFailed
from tuili.models.model import Model
from tuili.models.tokenizer import Tokenizer

Prompt = str | list[int] | list[dict[str, Any]] | dict[str, Any]  # text, ids, chat messages, vLLM's prompt dict


@dataclass
class Logprob:
    """vLLM's: a token's log-probability, its rank among the vocabulary (1: the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One choice of a prompt (vLLM's `CompletionOutput`)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (eos, stop token or stop string), "length" or "abort"
    cumulative_logprob: float | None = None  # with SamplingParams(logprobs=n)
    logprobs: list[dict[int, Logprob]] | None = None  # per token: the chosen one and the top n


@dataclass
class Completion:
    """A prompt's finished request (vLLM's `RequestOutput`): its choices in `outputs`, and timings.
    `text`, `token_ids` and `finish_reason` are the first choice's."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    time_to_first_token: float  # seconds from the call (or the request's arrival) to its first token
    seconds: float  # to its last
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    finished: bool = True

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def decode_tokens_per_second(self) -> float:
        """The first choice's tokens after its first, per second of decoding (prefill excluded)."""
        decode, n = self.seconds - self.time_to_first_token, len(self.token_ids)
        return (n - 1) / decode if decode > 0 and n > 1 else 0.0


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """vLLM's: one prompt's embedding (mean-pooled final hidden states, unit length)."""

    prompt_token_ids: list[int]
    outputs: EmbeddingOutput


class LLM:
    """Offline inference on a loaded `Model` or anything `tuili.load` accepts; engine options as
    `LLMEngine` (max_num_seqs, kv_cache_bytes, kv_cache_dtype, threads, ...)."""

    def __init__(self, model: Model | str, **engine_options):
        if isinstance(model, str):
            from tuili.models import load

            model = load(model)
        self.model = model
        self.engine = LLMEngine(model, **engine_options)

    def get_tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,  # accepted for vLLM's callers; tuili shows no progress bar here
    ) -> list[Completion]:
        """Complete every prompt (`n` choices each), all batched together; one `Completion` per prompt, in order."""
        prompts = _as_list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        start = time.perf_counter()
        jobs = [(i, j, self._choice(p, sp, j)) for i, (p, sp) in enumerate(zip(prompts, params)) for j in range(sp.n)]
        ids = [self.engine.add_request(tokens, sp) for _, _, (tokens, sp) in jobs]
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = _succeeded(out)
        finally:
            for request_id in ids:
                if request_id not in done:
                    self.engine.abort(request_id)
        grouped: list[list[RequestOutput]] = [[] for _ in prompts]
        for (i, _, _), request_id in zip(jobs, ids):
            grouped[i].append(done[request_id])
        return [self._completion(p, outs, start) for p, outs in zip(prompts, grouped)]

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[Completion]:
        """Answer one conversation (a list of {"role", "content"} messages) or several, each rendered
        with the model's chat template."""
        one = bool(messages) and isinstance(messages[0], dict)
        conversations = cast(list[Prompt], [messages] if one else list(messages))
        return self.generate(conversations, sampling_params, use_tqdm)

    def embed(self, prompts: Prompt | Sequence[Prompt]) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (mean-pooled, L2-normalised final hidden states)."""
        from tuili.engine.pooling import embed

        ids = [prompt_ids(self.model, p) for p in _as_list(prompts)]
        for tokens in ids:
            self.engine.validate(tokens, SamplingParams(max_tokens=1))
        with self.engine.no_grad():
            vectors = embed(self.model, ids)
        return [EmbeddingRequestOutput(p, EmbeddingOutput(v.tolist())) for p, v in zip(ids, vectors)]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield one prompt's completion text piece by piece; closing the iterator aborts it."""
        request_id = self.engine.add_request(prompt_ids(self.model, prompt), params or SamplingParams())
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = _succeeded(out).finished
                        if out.delta:
                            yield out.delta
        finally:
            if not finished:
                self.engine.abort(request_id)

    def _choice(self, prompt: Prompt, params: SamplingParams, j: int) -> tuple[list[int], SamplingParams]:
        """A prompt's ids and choice j's parameters (one sequence each: n=1, seed + j)."""
        seed = None if params.seed is None else wrap_seed(params.seed + j)
        return prompt_ids(self.model, prompt), dataclasses.replace(params, n=1, seed=seed)

    def _completion(self, prompt: Prompt, outs: list[RequestOutput], start: float) -> Completion:
        began = max(start, outs[0].arrival_time)
        finished = [o.finished_time or began for o in outs]
        first = min((o.first_token_time or f) for o, f in zip(outs, finished)) - began
        last = max(finished) - began
        choices = [self._output(j, out) for j, out in enumerate(outs)]
        text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
        return Completion(
            outs[0].request_id,
            text,
            outs[0].prompt_token_ids,
            choices,
            first,
            last,
            outs[0].num_cached_tokens,
        )

    def _output(self, index: int, out: RequestOutput) -> CompletionOutput:
        if not out.logprobs:
            return CompletionOutput(index, out.text, out.token_ids, out.finish_reason)
        text = self.model.tokenizer.decode
        logprobs = []
        for entry in out.logprobs:
            step = {
                t: Logprob(lp, rank, text([t], skip_special_tokens=False)) for rank, (t, lp) in enumerate(entry.top, 1)
            }
            step[entry.token_id] = Logprob(entry.logprob, entry.rank, text([entry.token_id], skip_special_tokens=False))
            logprobs.append(step)
        cumulative = sum(entry.logprob for entry in out.logprobs)
        return CompletionOutput(index, out.text, out.token_ids, out.finish_reason, cumulative, logprobs)


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids, chat messages, a prompt dict) or a sequence of them -> a list."""
    if isinstance(prompts, (str, dict)) or not prompts:
        return [cast(Prompt, prompts)]
    first = prompts[0]
    if isinstance(first, int) or (isinstance(first, dict) and "role" in first):
        return [cast(Prompt, prompts)]
    return list(cast(Sequence[Prompt], prompts))


def prompt_ids(model: Model, prompt: Prompt) -> list[int]:
    """Token ids of any prompt form; vLLM's {"prompt": ...} and {"prompt_token_ids": [...]} included."""
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids"}
        if unknown or len(prompt) != 1:
            raise ValueError(
                "a prompt dict holds exactly one of 'prompt' (text) or 'prompt_token_ids' (ids); "
                f"got {sorted(prompt)} (multi-modal data and the like are not supported)"
            )
        return (
            list(prompt["prompt_token_ids"]) if "prompt_token_ids" in prompt else encode_prompt(model, prompt["prompt"])
        )
    return encode_prompt(model, prompt)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"{count} prompts but {len(params)} SamplingParams: give one, or one per prompt")
    return params


def _succeeded(out: RequestOutput) -> RequestOutput:
    """The output, or RequestFailed where its request failed in its own work."""
    if out.error is not None:
        raise RequestFailed(f"request {out.request_id} failed: {out.error}")
    return out


__all__ = ["LLM", "Completion", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "Logprob", "Prompt"]
