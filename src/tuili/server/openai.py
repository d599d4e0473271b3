"""Turning the engine's outputs into OpenAI response objects: choices, stream chunks, log-probabilities
and usage for completions and chat completions, embeddings and log-likelihood lists, and the header
that names the bookkeeping fields a request sent and tuili ignored."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from torch import Tensor

from tuili.engine.pooling import Score
from tuili.engine.request import RequestOutput
from tuili.engine.sampling import TokenLogprob
from tuili.engine.tools import ToolStream
from tuili.models.tokenizer import Tokenizer
from tuili.server.errors import error_body
from tuili.server.protocol import _Request

log = logging.getLogger("tuili.server")


class TokenText:
    """The text of single tokens, as log-probability entries show them (cached: a vocabulary is small)."""

    def __init__(self, tokenizer: Tokenizer):
        self.of = lru_cache(maxsize=1 << 16)(lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False))


@dataclass
class Echo:
    """A completions prompt given back (`echo`): its text, its tokens, and with `logprobs` each
    token's log-probability after the ones before it (`score`: of ids[1:]; nothing predicts ids[0])."""

    text: str
    ids: list[int]
    score: Score | None = None

    def entries(self) -> list[TokenLogprob | None]:
        """Log-probability entries of the prompt's tokens: None for the first, as OpenAI and vLLM give it."""
        if self.score is None:
            return []
        tops = self.score.top_logprobs or [[] for _ in self.ids[1:]]
        scored = [TokenLogprob(t, lp, top) for t, lp, top in zip(self.ids[1:], self.score.token_logprobs, tops)]
        return [None, *scored]


def prompt_logprobs(echo: Echo, tokens: TokenText) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first) its own log-probability and
    rank beside the most likely alternatives, keyed by token id."""
    score = echo.score
    assert score is not None and score.ranks is not None, "prompt log-probabilities are scored first"
    entries: list[dict | None] = [None]
    tops = score.top_logprobs or [[] for _ in echo.ids[1:]]
    for token, logprob, rank, top in zip(echo.ids[1:], score.token_logprobs, score.ranks, tops):
        entry = {str(t): {"logprob": v, "rank": i + 1, "decoded_token": tokens.of(t)} for i, (t, v) in enumerate(top)}
        entry[str(token)] = {"logprob": logprob, "rank": rank, "decoded_token": tokens.of(token)}
        entries.append(entry)
    return entries


def completion_logprobs(
    entries: list[TokenLogprob | None], tokens: TokenText, offset: int = 0, ids: list[int] | None = None
) -> dict:
    """The completions API's form: parallel lists, with text offsets into the completion (an entry
    of None, an echoed prompt's first token, has its id in `ids` and no log-probabilities)."""
    token_ids = [e.token_id if e is not None else (ids or [0])[0] for e in entries]
    texts = [tokens.of(t) for t in token_ids]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob if e is not None else None for e in entries],
        "top_logprobs": [{tokens.of(t): lp for t, lp in e.top} if e is not None else None for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[TokenLogprob], tokens: TokenText) -> dict:
    """The chat API's form: one object per token with its bytes and its top alternatives."""

    def item(token_id: int, logprob: float) -> dict:
        text = tokens.of(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class Formatter:
    """Response objects for one request; `chat` picks the chat-completions shapes."""

    def __init__(
        self,
        request_id: str,
        model: str,
        created: int,
        chat: bool,
        tokens: TokenText,
        logprobs: bool,
        include_usage: bool,
        continuous_usage: bool = False,
        echoes: list[Echo] | None = None,
        n: int = 1,
        prompts: list[Echo] | None = None,
        tools: Callable[[], ToolStream] | None = None,
    ):
        self.id, self.model, self.created, self.chat = request_id, model, created, chat
        self.echoes, self.n = echoes, n  # completions with echo: each prompt's, for its n choices
        self.prompts = prompts  # with vLLM's prompt_logprobs: each prompt's, scored
        self.tokens, self.logprobs, self.include_usage = tokens, logprobs, include_usage
        self.continuous_usage = continuous_usage  # every chunk carries its choice's usage so far
        self.object = "chat.completion" if chat else "text_completion"
        self._offsets: dict[int, int] = {}  # choice index -> characters streamed (completion text offsets)
        self.tools = tools  # with tools: a parser per choice, which reads its calls out of its text
        self._parsers: dict[int, ToolStream] = {}
        self._calls: dict[int, int] = {}  # choice index -> tool calls streamed
        # The common stream chunk (text, no log-probabilities, not the last) is a template around
        # the JSON of its text: a streaming server writes one per token, and building and encoding
        # the whole object each time was most of the event loop's work per token.
        head = json.dumps(
            {
                "id": self.id,
                "object": self.object + ".chunk" if chat else self.object,
                "created": created,
                "model": model,
            },
            ensure_ascii=False,
        )[:-1]
        self._head = f'data: {head}, "choices": [{{"index": '
        self._field, self._close = (', "delta": {"content": ', "}") if chat else (', "text": ', "")
        self._open_tail = ', "logprobs": null, "finish_reason": null}]'
        self._tail = self._open_tail + (', "usage": null' if include_usage else "") + "}\n\n"

    def _logprobs(self, entries: list[TokenLogprob], index: int) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(entries, self.tokens)
        offset = self._offsets.get(index, 0)
        return completion_logprobs(entries, self.tokens, offset)

    def choice(self, index: int, out: RequestOutput | None) -> dict:
        """A finished choice of a non-streaming response (`out` None: an echoed prompt, max_tokens 0),
        with vLLM's `prompt_logprobs` where asked."""
        choice = self._choice(index, out)
        if self.prompts is not None:
            choice["prompt_logprobs"] = prompt_logprobs(self.prompts[index // self.n], self.tokens)
        return choice

    def _choice(self, index: int, out: RequestOutput | None) -> dict:
        echo = self.echoes[index // self.n] if self.echoes else None
        if echo is not None:
            entries = [*echo.entries(), *(out.logprobs if out else [])]
            logprobs = completion_logprobs(entries, self.tokens, 0, echo.ids) if self.logprobs else None
            text = echo.text + (out.text if out else "")
            return {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": out.finish_reason if out else "length",
            }
        assert out is not None, "only an echoed prompt has a choice without output"
        choice = {"index": index, "logprobs": self._logprobs(out.logprobs, index), "finish_reason": out.finish_reason}
        if self.chat and self.tools is not None:
            content, calls = self.tools().feed(out.text, final=True)
            choice["message"] = {"role": "assistant", "content": content or None}
            if calls:  # as OpenAI: no tool_calls key in a reply without calls
                choice["message"]["tool_calls"] = [call.openai() for call in calls]
            choice["finish_reason"] = _finish(out, bool(calls))
        elif self.chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = out.text
        return choice

    def echo_chunk(self, index: int, finished: bool = False) -> str:
        """A completions stream opens each choice with its echoed prompt (and its log-probabilities)."""
        assert self.echoes is not None
        echo = self.echoes[index // self.n]
        logprobs = completion_logprobs(echo.entries(), self.tokens, 0, echo.ids) if self.logprobs else None
        if logprobs is not None:
            self._offsets[index] = sum(len(t) for t in logprobs["tokens"])
        reason = "length" if finished else None
        return self._chunk([{"index": index, "text": echo.text, "logprobs": logprobs, "finish_reason": reason}])

    def response(self, choices: list[dict], usage_: dict) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_,
        }

    def _chunk(self, choices: list[dict], usage_: dict | None = None) -> str:
        chunk = {
            "id": self.id,
            "object": self.object + ".chunk" if self.chat else self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage_
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def role_chunk(self, index: int, usage_: dict | None = None) -> str:
        """Chat streams open each choice with the assistant's role (`usage_`: continuous usage)."""
        return self._chunk(
            [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
            usage_,
        )

    def delta_chunk(self, index: int, out: RequestOutput, usage_: dict | None = None) -> str | None:
        """A stream chunk for one step's output, or None when it carries nothing to show;
        `usage_`: the choice's usage so far, where the request asked for it in every chunk."""
        if not out.delta and not out.finished and not (self.logprobs and out.new_logprobs):
            return None
        if self.tools is not None:
            return self._tool_chunk(index, out, usage_)
        if not out.finished and not self.logprobs:
            tail = self._tail if usage_ is None else f'{self._open_tail}, "usage": {json.dumps(usage_)}}}\n\n'
            return f"{self._head}{index}{self._field}{json.dumps(out.delta, ensure_ascii=False)}{self._close}{tail}"
        logprobs = self._logprobs(out.new_logprobs, index)
        if not self.chat and logprobs is not None:
            self._offsets[index] = self._offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
        choice = {"index": index, "logprobs": logprobs, "finish_reason": out.finish_reason}
        if self.chat:
            choice["delta"] = {"content": out.delta} if out.delta or not out.finished else {}
        else:
            choice["text"] = out.delta
        return self._chunk([choice], usage_)

    def _tool_chunk(self, index: int, out: RequestOutput, usage_: dict | None) -> str | None:
        """A chat stream chunk where the text may hold tool calls: text that may open a call is held
        back, and each call comes whole, in one `tool_calls` delta, once its text is complete."""
        assert self.tools is not None
        parser = self._parsers.setdefault(index, self.tools())
        content, calls = parser.feed(out.delta, out.finished)
        delta: dict = {"content": content} if content else {}
        if calls:
            first = self._calls.get(index, 0)
            delta["tool_calls"] = [{"index": first + k, **call.openai()} for k, call in enumerate(calls)]
            self._calls[index] = first + len(calls)
        logprobs = self._logprobs(out.new_logprobs, index)
        if not delta and not out.finished and logprobs is None:
            return None
        reason = _finish(out, bool(parser.calls)) if out.finished else None
        return self._chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}], usage_)

    def usage_chunk(self, usage_: dict) -> str:
        return self._chunk([], usage_)


def _finish(out: RequestOutput, called: bool) -> str | None:
    """OpenAI's finish_reason: "tool_calls" where a choice that ended on its own made calls."""
    return "tool_calls" if called and out.finish_reason == "stop" else out.finish_reason


def embedding_list(vectors: list[Tensor], encoding_format: str, model: str, prompt_tokens: int) -> dict:
    """/v1/embeddings: one vector per input, as floats or base64 little-endian float32."""
    data = []
    for i, v in enumerate(vectors):
        value = (
            base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if encoding_format == "base64" else v.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model, "usage": usage_of(prompt_tokens)}


def loglikelihood_list(
    scores: list[Score],
    continuations: list[list[int]],
    top_logprobs: int,
    tokens: TokenText,
    model: str,
    prompt_tokens: int,
) -> dict:
    """/v1/loglikelihood: per pair, log P(continuation | context), its tokens and theirs."""
    data = []
    for i, (score, continuation) in enumerate(zip(scores, continuations)):
        entry = {
            "object": "loglikelihood",
            "index": i,
            "logprob": score.logprob,
            "is_greedy": score.is_greedy,
            "num_tokens": len(continuation),
            "tokens": [tokens.of(t) for t in continuation],
            "token_logprobs": score.token_logprobs,
        }
        if top_logprobs:
            entry["top_logprobs"] = [{tokens.of(t): lp for t, lp in top} for top in score.top_logprobs]
        data.append(entry)
    return {"object": "list", "data": data, "model": model, "usage": usage_of(prompt_tokens)}


def usage_of(prompt_tokens: int) -> dict:
    """Usage of a request that generates nothing (embeddings, scores)."""
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}


def ignored_header(body: _Request) -> dict[str, str]:
    """The response header naming the bookkeeping fields a request sent and tuili ignored (also logged)."""
    if not body.ignored_fields:
        return {}
    log.info("ignored the bookkeeping fields %s", ", ".join(body.ignored_fields))
    return {"X-Tuili-Ignored-Fields": ", ".join(body.ignored_fields)}


def sse_error(status: int, message: str) -> str:
    return f"data: {json.dumps(error_body(status, message))}\n\n"


DONE = "data: [DONE]\n\n"
