"""The OpenAI-compatible HTTP API over `AsyncLLM`: FastAPI routes, limits, readiness and metrics.

`Server(llm, ServerConfig(...)).app` is an ASGI app; `tuili.server.serve` runs it under uvicorn.
Generation goes through the engine's continuous batching; embeddings and log-likelihood scoring,
one forward pass each, go through a `DynamicBatcher` onto the engine thread between its steps.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tuili.engine.async_llm import AsyncLLM
from tuili.engine.llm import encode_prompt
from tuili.engine.pooling import embed, loglikelihood
from tuili.engine.request import RequestOutput
from tuili.engine.sampling import SamplingParams
from tuili.errors import TuiliError
from tuili.server import errors
from tuili.server.batcher import DynamicBatcher
from tuili.server.errors import APIError
from tuili.server.metrics import CONTENT_TYPE, Metrics
from tuili.server.middleware import AccessLog, ApiKey, BodyLimit
from tuili.server.openai import DONE, Formatter, TokenText, sse_error, usage
from tuili.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoglikelihoodRequest,
    TokenizeRequest,
    _Request,
    _Sampling,
    message_dict,
)

log = logging.getLogger("tuili.server")
OPEN_PATHS = {"/health", "/ready", "/metrics", "/docs", "/openapi.json"}
_WARMUP_TEXT = (
    "Warm-up: the server runs a few short requests through every path before it reports "
    "that it is ready, so the first real request does not pay for compiling kernels."
)


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


class _Choices:
    """Runs a request's sequences (prompts × n) on the engine and yields (choice index, output)
    as they arrive. `cancel()` aborts the ones still running and ends the iteration."""

    _END = object()

    def __init__(
        self,
        llm: AsyncLLM,
        jobs: list[tuple[int, list[int], SamplingParams]],
        request_id: str,
        on_done: Callable[[bool], None],
    ):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = len(jobs)
        self.finished: set[int] = set()
        self.tasks = []
        for index, ids, params in jobs:
            task = asyncio.create_task(self._pump(llm, index, ids, params, f"{request_id}-{index}"))
            # once per sequence, however it ends (a task cancelled before it starts runs no finally)
            task.add_done_callback(lambda _, index=index: on_done(index in self.finished))
            self.tasks.append(task)

    async def _pump(self, llm: AsyncLLM, index: int, ids: list[int], params: SamplingParams, rid: str) -> None:
        try:
            async for out in llm.generate(ids, params, rid):
                if out.finished:
                    self.finished.add(index)
                self.queue.put_nowait((index, out))
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            self.queue.put_nowait((index, error))
        self.queue.put_nowait((index, None))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self.remaining:
            index, item = await self.queue.get()
            if item is self._END:
                return
            if item is None:
                self.remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.queue.put_nowait((-1, self._END))


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    def __init__(self, llm: AsyncLLM, config: ServerConfig = ServerConfig()):
        self.llm, self.config = llm, config
        self.model = llm.model
        self.tokenizer = llm.model.tokenizer
        self.context = llm.model.config.max_position_embeddings
        self.tokens = TokenText(self.tokenizer)
        self.metrics = Metrics(llm.stats)
        self.ready = False
        self.failure: str | None = None  # why warm-up failed, if it did
        self.in_flight = 0  # sequences running or waiting in the engine for this server
        self.embedder = DynamicBatcher(
            self._embed_batch,
            max_batch_size=config.embed_batch_size,
            max_wait=config.embed_max_wait,
            max_batch_tokens=config.embed_batch_tokens,
            size=len,
        )
        self.scorer = DynamicBatcher(
            self._score_batch,
            max_batch_size=config.embed_batch_size,
            max_wait=config.embed_max_wait,
            max_batch_tokens=config.embed_batch_tokens,
            size=lambda item: len(item[0]) + len(item[1]),
        )
        self.app = self._build()

    # ---- the app ---------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI):
            warm = asyncio.create_task(self._warm_up()) if self.config.warmup else None
            if warm is None:
                self.ready = True
            yield
            if warm is not None:
                warm.cancel()
            await self.embedder.close()
            await self.scorer.close()
            await asyncio.get_running_loop().run_in_executor(None, self.llm.shutdown)

        app = FastAPI(title="tuili", description="OpenAI-compatible API of a tuili model", lifespan=lifespan)
        errors.install(app)
        routes = [
            ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/chat/completions", self.chat),
            ("GET", "/v1/models", self.models),
            ("POST", "/v1/embeddings", self.embeddings),
            ("POST", "/v1/loglikelihood", self.loglikelihood),
            ("POST", "/tokenize", self.tokenize),
            ("POST", "/detokenize", self.detokenize),
            ("GET", "/health", self.health),
            ("GET", "/ready", self.readiness),
            ("GET", "/metrics", self.metrics_page),
        ]
        for method, path, handler in routes:
            app.add_api_route(path, handler, methods=[method])
        # outermost first: the access log sees every request, including those refused below it
        app.add_middleware(BodyLimit, limit=self.config.max_body_bytes)
        if self.config.api_key:
            app.add_middleware(ApiKey, key=self.config.api_key, open_paths=OPEN_PATHS)
        app.add_middleware(
            AccessLog,
            count=lambda path, status: self.metrics.requests.labels(path, status).inc(),
            endpoints={path for _, path, _ in routes},
        )
        return app

    # ---- operations ------------------------------------------------------------------------
    async def health(self) -> JSONResponse:
        """Liveness: the process and its engine thread are running."""
        if not self.llm.alive:
            return JSONResponse({"status": "engine stopped", "error": str(self.llm.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def readiness(self) -> JSONResponse:
        """Readiness: warm-up is done and requests are served at full speed."""
        if self.ready and self.llm.alive:
            return JSONResponse({"status": "ready"})
        status = f"warm-up failed: {self.failure}" if self.failure else "warming up"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})

    async def metrics_page(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def _warm_up(self) -> None:
        start = time.perf_counter()
        try:
            ids = self.tokenizer.encode(_WARMUP_TEXT)[:48] or [0]
            params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            for batch in (1, 4):  # a single stream, then a batched decode (other kernels)
                await asyncio.gather(*(self._drain(ids + [i], params, f"warmup-{batch}-{i}") for i in range(batch)))
            await self.embedder.submit(ids[:16])
            await self.scorer.submit((ids[:8], ids[8:12], 0))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported by /ready and the log
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("warm-up failed; /ready will answer 503")
            return
        self.ready = True
        log.info("ready: warm-up took %.1f s", time.perf_counter() - start)

    async def _drain(self, ids: list[int], params: SamplingParams, request_id: str) -> None:
        async for _ in self.llm.generate(ids, params, request_id):
            pass

    def _check_ready_and_model(self, model: str | None) -> None:
        if not self.llm.alive:
            raise APIError(503, f"the engine has stopped ({self.llm.error}); restart the server")
        if not self.ready:
            raise APIError(
                503, "the server is warming up; retry in a moment (GET /ready says when)", headers={"Retry-After": "1"}
            )
        self._check_model(model)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.config.model_names:
            raise APIError(
                404,
                f"the model {model!r} does not exist here; this server serves "
                f"{self.config.model_names[0]!r} (GET /v1/models)",
                "model",
                "model_not_found",
            )

    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.config.model_names[0],
                    "object": "model",
                    "created": 0,
                    "owned_by": "tuili",
                    "root": self.model.source,
                    "max_model_len": self.context,
                }
            ],
        }

    # ---- tokens ------------------------------------------------------------------------------
    def _encode(self, prompt: str | list[int], param: str, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = self._in_vocabulary(list(prompt), param)
        if not ids:
            raise APIError(400, f"{param} is empty: give at least one token of text", param)
        return ids

    def _in_vocabulary(self, ids: list[int], param: str) -> list[int]:
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must be in [0, {vocab}), the model's vocabulary", param)
        return ids

    def _render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        try:
            if add_generation_prompt:
                return encode_prompt(self.model, messages)
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
            return self.tokenizer.encode(text, add_special_tokens=False)
        except (TuiliError, ValueError) as e:
            raise APIError(
                400, f"the messages could not be rendered with the model's chat template: {e}", "messages"
            ) from None

    async def tokenize(self, body: TokenizeRequest, response: Response) -> dict:
        response.headers.update(_ignored(body))
        self._check_model(body.model)
        if body.messages is not None:
            ids = self._render_chat([message_dict(m) for m in body.messages], body.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    async def detokenize(self, body: DetokenizeRequest, response: Response) -> dict:
        response.headers.update(_ignored(body))
        self._check_model(body.model)
        self._in_vocabulary(body.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # ---- generation --------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_ready_and_model(body.model)
        try:
            prompts = [self._encode(p, "prompt") for p in body.prompts()]
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        return await self._generate(request, body, prompts, body.max_tokens, body.logprobs, chat=False)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_ready_and_model(body.model)
        ids = self._render_chat(body.conversation())
        return await self._generate(request, body, [ids], body.requested_max_tokens, body.num_logprobs, chat=True)

    def _jobs(
        self, body: _Sampling, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None
    ) -> list[tuple[int, list[int], SamplingParams]]:
        """Check every limit, then one (choice index, prompt ids, params) per prompt × n."""
        limit = self.config.max_tokens or self.context
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens ({max_tokens}) exceeds this server's limit of {limit}", "max_tokens")
        jobs = []
        for i, ids in enumerate(prompts):
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
            wanted = max_tokens if max_tokens is not None else min(limit, self.context - len(ids))
            for j in range(body.n):
                try:
                    params = body.sampling_params(wanted, logprobs, j)
                    self.llm.engine.validate(ids, params)
                except ValueError as e:
                    raise APIError(400, str(e), "max_tokens" if "max_tokens" in str(e) else None) from None
                jobs.append((i * body.n + j, ids, params))
        if self.in_flight + len(jobs) > self.config.max_queued_requests:
            raise APIError(
                429,
                f"the server is busy ({self.in_flight} sequences running or queued, limit "
                f"{self.config.max_queued_requests}); retry after a second",
                headers={"Retry-After": "1"},
            )
        return jobs

    async def _generate(
        self,
        request: Request,
        body: _Sampling,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
        chat: bool,
    ) -> Response:
        jobs = self._jobs(body, prompts, max_tokens, logprobs)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        request.state.request_id = request_id
        fmt = Formatter(
            request_id,
            self.config.model_names[0],
            int(time.time()),
            chat,
            self.tokens,
            logprobs is not None,
            body.include_usage,
        )
        record = _Recorder(self.metrics, time.perf_counter(), [len(ids) for ids in prompts], body.n)
        self.in_flight += len(jobs)
        choices = _Choices(self.llm, jobs, request_id, self._sequence_done)
        # a client that leaves (even before the response starts) has its sequences aborted
        gone = asyncio.create_task(_disconnected(request))
        gone.add_done_callback(lambda task: task.cancelled() or choices.cancel())
        headers = {"X-Request-Id": request_id, **_ignored(body)}
        if body.stream:
            return StreamingResponse(
                self._stream(choices, gone, fmt, record, len(jobs)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **headers},
            )
        response = await self._complete(choices, gone, fmt, record)
        response.headers.update(headers)
        return response

    def _sequence_done(self, finished: bool) -> None:
        self.in_flight -= 1
        if not finished:  # the client left, or the grace period after SIGTERM ran out
            self.metrics.finished.labels("abort").inc()

    async def _complete(self, choices: _Choices, gone: asyncio.Task, fmt: Formatter, record: _Recorder) -> Response:
        finals: dict[int, RequestOutput] = {}

        async def collect():
            async for index, out in choices:
                record.output(index, out)
                if out.finished:
                    finals[index] = out

        work = asyncio.create_task(collect())
        try:
            await asyncio.wait({work, gone}, timeout=self.config.request_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client left, or the time limit ran out: free its sequences
            choices.cancel()
            work.cancel()
            if gone.done() and not gone.cancelled():
                return Response(status_code=499)
            raise APIError(504, self._timeout_message())
        if work.exception() is not None:
            choices.cancel()  # the other choices of a failed request are not wanted
            raise APIError(500, f"generation failed: {work.exception()}")
        outs = [finals[i] for i in sorted(finals)]
        return JSONResponse(fmt.response([fmt.choice(i, out) for i, out in enumerate(outs)], record.usage(outs)))

    def _timeout_message(self) -> str:
        return (
            f"the request ran past this server's time limit of {self.config.request_timeout:g} s and was "
            "stopped; ask for fewer tokens (max_tokens), or start the server with a larger --request-timeout"
        )

    async def _stream(
        self, choices: _Choices, gone: asyncio.Task, fmt: Formatter, record: _Recorder, count: int
    ) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        try:
            if fmt.chat:
                for index in range(count):
                    yield fmt.role_chunk(index)
            async with asyncio.timeout(self.config.request_timeout):
                async for index, out in choices:
                    record.output(index, out)
                    if out.finished:
                        finals[index] = out
                    chunk = fmt.delta_chunk(index, out)
                    if chunk is not None:
                        yield chunk
            if len(finals) == count:
                if fmt.include_usage:
                    yield fmt.usage_chunk(record.usage([finals[i] for i in sorted(finals)]))
                yield DONE
        except TimeoutError:
            yield sse_error(504, self._timeout_message())
        except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
            log.exception("a stream failed")
            yield sse_error(500, f"generation failed: {e}")
        finally:
            gone.cancel()
            choices.cancel()

    # ---- embeddings and scoring ------------------------------------------------------------
    async def _embed_batch(self, batch: list[list[int]]) -> list:
        return list(await self.llm.call(embed, self.model, batch))

    async def _score_batch(self, batch: list[tuple[list[int], list[int], int]]) -> list:
        top = max(item[2] for item in batch)
        scores = await self.llm.call(loglikelihood, self.model, [(c, x) for c, x, _ in batch], top)
        for score, (_, _, n) in zip(scores, batch):
            score.top_logprobs = [t[:n] for t in score.top_logprobs] if n else []
        return scores

    async def embeddings(self, body: EmbeddingRequest, response: Response) -> dict:
        response.headers.update(_ignored(body))
        self._check_ready_and_model(body.model)
        try:
            inputs = [self._encode(x, "input") for x in body.inputs()]
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
        vectors = await asyncio.gather(*(self.embedder.submit(ids) for ids in inputs))
        data = []
        for i, v in enumerate(vectors):
            value = (
                base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
                if body.encoding_format == "base64"
                else v.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(map(len, inputs))
        return {
            "object": "list",
            "data": data,
            "model": self.config.model_names[0],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def loglikelihood(self, body: LoglikelihoodRequest, response: Response) -> dict:
        response.headers.update(_ignored(body))
        self._check_ready_and_model(body.model)
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
        scores = await asyncio.gather(*(self.scorer.submit(item) for item in items))
        data = []
        for i, (score, (_, continuation, _)) in enumerate(zip(scores, items)):
            entry = {
                "object": "loglikelihood",
                "index": i,
                "logprob": score.logprob,
                "is_greedy": score.is_greedy,
                "num_tokens": len(continuation),
                "tokens": [self.tokens.of(t) for t in continuation],
                "token_logprobs": score.token_logprobs,
            }
            if body.top_logprobs:
                entry["top_logprobs"] = [{self.tokens.of(t): lp for t, lp in top} for top in score.top_logprobs]
            data.append(entry)
        tokens = sum(len(c) + len(x) for c, x, _ in items)
        return {
            "object": "list",
            "data": data,
            "model": self.config.model_names[0],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _ignored(body: _Request) -> dict[str, str]:
    """The response header naming the bookkeeping fields a request sent and tuili ignored (also logged)."""
    if not body.ignored_fields:
        return {}
    log.info("ignored the bookkeeping fields %s", ", ".join(body.ignored_fields))
    return {"X-Tuili-Ignored-Fields": ", ".join(body.ignored_fields)}


class _Recorder:
    """Latency metrics of one request as the client sees them, and its token counts."""

    def __init__(self, metrics: Metrics, start: float, prompt_lengths: list[int], n: int):
        self.metrics, self.start, self.prompt_lengths, self.n = metrics, start, prompt_lengths, n
        self.last: dict[int, float] = {}

    def output(self, index: int, out: RequestOutput) -> None:
        now, new = time.perf_counter(), len(out.new_token_ids)
        m = self.metrics
        if new:
            if index in self.last:
                gap = (now - self.last[index]) / new
                for _ in range(new):
                    m.itl.observe(gap)
            else:
                m.ttft.observe(now - self.start)
            self.last[index] = now
            m.generation_tokens.inc(new)
        if out.finished:
            m.e2e.observe(now - self.start)
            if out.scheduled_time is not None:
                m.queue.observe(out.scheduled_time - out.arrival_time)
            m.finished.labels(out.finish_reason or "unknown").inc()
            if index % self.n == 0:
                m.prompt_tokens.inc(self.prompt_lengths[index // self.n])

    def usage(self, outs: list[RequestOutput]) -> dict:
        cached = sum(out.num_cached_tokens for i, out in enumerate(outs) if i % self.n == 0)
        return usage(sum(self.prompt_lengths), sum(len(out.token_ids) for out in outs), cached)
