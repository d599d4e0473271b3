"""Single-stream generation on a contiguous KV cache: prefill the prompt, then decode token by token.

The engine's scheduler and paged cache will replace the internals; `stream` and `generate` stay.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tuili.engine.detokenize import TextStream
from tuili.engine.sampling import SamplingParams, apply_penalties, sample
from tuili.models.cache import ContiguousKVCache
from tuili.models.model import Model


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    time_to_first_token: float  # seconds
    seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, per second of decoding (prefill excluded)."""
        decode = self.seconds - self.time_to_first_token
        return (len(self.token_ids) - 1) / decode if decode > 0 and len(self.token_ids) > 1 else 0.0


def encode_prompt(model: Model, prompt: str | list[int] | list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt: text, ids, or chat messages (rendered with the chat template)."""
    if isinstance(prompt, str):
        return model.tokenizer.encode(prompt)
    if prompt and isinstance(prompt[0], dict):
        text = model.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        return model.tokenizer.encode(text, add_special_tokens=False)
    return list(prompt)


@torch.no_grad()  # not inference_mode: tensor-subclass layers (quanto, torchao) refuse it
def stream_tokens(model: Model, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield generated token ids until eos or max_tokens (stop strings are handled by `stream`)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    module = model.module
    max_len = len(prompt_ids) + params.max_tokens
    limit = model.config.max_position_embeddings
    if max_len > limit:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                         f"the model's context of {limit} tokens")
    cache = ContiguousKVCache(model.config, 1, max_len, dtype=module.dtype, device=module.device)
    gen = torch.Generator(device=module.device)
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    eos = _stop_ids(model, params)
    ids = torch.tensor([prompt_ids], device=module.device)
    positions = torch.arange(len(prompt_ids), device=module.device)[None]
    output: list[int] = []
    for _ in range(params.max_tokens):
        logits = module(ids, positions, cache, last_only=True).logits[:, -1]
        if params.penalized:
            logits = apply_penalties(logits, params, [prompt_ids], [output])
        token = sample(logits, params, gen)
        token_id = int(token)
        output.append(token_id)
        yield token_id
        if token_id in eos:
            return
        ids, positions = token[:, None], positions[:, -1:] + 1


def stream(model: Model, prompt: str | list[int] | list[dict[str, str]],
           params: SamplingParams = SamplingParams()) -> Iterator[str]:
    """Yield the completion's text piece by piece as tokens are generated."""
    yield from (delta for delta, _ in _generate(model, encode_prompt(model, prompt), params) if delta)


def generate(model: Model, prompt: str | list[int] | list[dict[str, str]],
             params: SamplingParams = SamplingParams()) -> Completion:
    """Generate one completion and time it."""
    prompt_ids = encode_prompt(model, prompt)
    start, first = time.perf_counter(), None
    completion = None
    for _, state in _generate(model, prompt_ids, params):
        first = first or time.perf_counter() - start
        completion = state
    completion.time_to_first_token = first
    completion.seconds = time.perf_counter() - start
    return completion


def _generate(model: Model, prompt_ids: list[int], params: SamplingParams) -> Iterator[tuple[str, Completion]]:
    """(text delta, completion so far) per token; eos and stop strings are cut from the text.

    While stop strings are set, the last len(longest stop) − 1 characters are held back, so a stop
    string is never half-printed before it is recognised.
    """
    text = TextStream(model.tokenizer)
    state = Completion("", [], prompt_ids, "length", 0.0, 0.0)
    eos = _stop_ids(model, params)
    holdback = max((len(s) for s in params.stop), default=1) - 1
    for token_id in stream_tokens(model, prompt_ids, params):
        state.token_ids.append(token_id)
        if token_id in eos:
            state.finish_reason = "stop"
            break
        text.push(token_id)
        stop_at = _find_stop(text.text, params.stop)
        if stop_at is not None:
            state.finish_reason = "stop"
            yield _advance(state, text.text[:stop_at]), state
            return
        yield _advance(state, text.text[: len(text.text) - holdback]), state
    text.flush()
    yield _advance(state, text.text), state


def _advance(state: Completion, text: str) -> str:
    """Extend the completion's text to `text` (when longer) and return what was added."""
    delta = text[len(state.text):]
    state.text += delta
    return delta
def _stop_ids(model: Model, params: SamplingParams) -> set[int]:
    """Token ids that end a generation: the model's eos (unless ignored) and the request's stop ids."""
    return (set() if params.ignore_eos else set(model.eos_token_ids)) | set(params.stop_token_ids)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
