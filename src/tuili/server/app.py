"""The OpenAI-compatible HTTP API over `AsyncLLM`: FastAPI routes, readiness and metrics.

`Server(llm, ServerConfig(...)).app` is an ASGI app; `tuili.server.serve` runs it under uvicorn.
Each route is thin: the request's schema (`protocol`), its checks (`limits`), the engine (generation
through continuous batching, assembled by `streams`; embeddings and scores, one forward pass each,
through a `DynamicBatcher` onto the engine thread between its steps), and the response's shape
(`openai`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tuili.engine import tools
from tuili.engine.async_llm import AsyncLLM
from tuili.engine.pooling import Score, embed, loglikelihood
from tuili.engine.sampling import SamplingParams
from tuili.engine.tools import ToolFormat
from tuili.server import errors
from tuili.server.batcher import DynamicBatcher
from tuili.server.config import ServerConfig
from tuili.server.limits import Limits
from tuili.server.metrics import CONTENT_TYPE, Metrics
from tuili.server.middleware import AccessLog, ApiKey, BodyLimit
from tuili.server.openai import (
    DONE,
    Echo,
    Formatter,
    TokenText,
    embedding_list,
    ignored_header,
    loglikelihood_list,
    usage,
)
from tuili.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoglikelihoodRequest,
    TokenizeRequest,
    _Sampling,
    message_dict,
)
from tuili.server.streams import Choices, Recorder, complete, stream, watch_disconnect
from tuili.server.tools import ToolUse

log = logging.getLogger("tuili.server")
OPEN_PATHS = {"/health", "/ready", "/metrics", "/version", "/docs", "/openapi.json"}
_WARMUP_TEXT = (
    "Warm-up: the server runs a few short requests through every path before it reports "
    "that it is ready, so the first real request does not pay for compiling kernels."
)


class Server:
    def __init__(self, llm: AsyncLLM, config: ServerConfig = ServerConfig()):
        self.llm, self.config = llm, config
        self.model = llm.model
        self.tokenizer = llm.model.tokenizer
        self.context = config.context(llm.model.config.max_position_embeddings)
        self.limits = Limits(config, llm)
        self.tokens = TokenText(self.tokenizer)
        self.metrics = Metrics(llm.stats, config.metrics_names, config.model_names[0])
        parser = config.tool_call_parser
        self.tool_format = ToolFormat.named(parser) if parser else ToolFormat.for_template(self.tokenizer.chat_template)
        self.ready = False
        self.failure: str | None = None  # why warm-up failed, if it did
        self.in_flight = 0  # sequences running or waiting in the engine for this server
        batching = dict(
            max_batch_size=config.embed_batch_size,
            max_wait=config.embed_max_wait,
            max_batch_tokens=config.embed_batch_tokens,
        )
        self.embedder = DynamicBatcher(self._embed_batch, size=len, **batching)
        self.scorer = DynamicBatcher(self._score_batch, size=lambda item: len(item[0]) + len(item[1]), **batching)
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
            await self.close()

        app = FastAPI(title="tuili", description="OpenAI-compatible API of a tuili model", lifespan=lifespan)
        errors.install(app)
        routes = [
            ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/chat/completions", self.chat),
            ("GET", "/v1/models", self.models),
            ("GET", "/v1/models/{model:path}", self.model_card),
            ("GET", "/version", self.version),
            ("GET", "/tokenizer_info", self.tokenizer_info),
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
        if self.config.cors is not None:  # outermost: a preflight needs no API key
            app.add_middleware(CORSMiddleware, **self.config.cors)
        return app

    async def close(self) -> None:
        """Stop the batchers and the engine loop (what the app's lifespan does at its end)."""
        await self.embedder.close()
        await self.scorer.close()
        await asyncio.get_running_loop().run_in_executor(None, self.llm.shutdown)

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

    async def warm_up(self) -> None:
        """A few short requests through every path (a stream, a batched decode, an embedding, a
        score), so the first real request does not pay for compiling kernels; raises what failed."""
        ids = self.tokenizer.encode(_WARMUP_TEXT)[:48] or [0]
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        seqs = self.llm.engine.scheduler.max_num_seqs  # none of them waits: a queue limit cannot refuse it
        for batch in (1, min(4, seqs)):  # a single stream, then a batched decode (other kernels)
            await asyncio.gather(*(self._drain(ids + [i], params, f"warmup-{batch}-{i}") for i in range(batch)))
        await self.embedder.submit(ids[:16])
        await self.scorer.submit((ids[:8], ids[8:12], 0))

    async def _warm_up(self) -> None:
        start = time.perf_counter()
        try:
            await self.warm_up()
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

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "tuili", "root": self.model.source,
                "max_model_len": self.context}  # fmt: skip

    async def models(self) -> dict:
        """Every name this server answers to (--served-model-name), one card each."""
        return {"object": "list", "data": [self._card(name) for name in self.config.model_names]}

    async def model_card(self, model: str) -> dict:
        self.limits.model_name(model)
        return self._card(model)

    async def version(self) -> dict:
        from tuili import __version__

        return {"version": __version__}

    async def tokenizer_info(self) -> dict:
        """The tokenizer's special tokens and chat template, as vLLM's endpoint gives them (what
        lm-evaluation-harness's remote tokenizer reads; /tokenize and /detokenize do the rest)."""
        tokenizer = self.tokenizer
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": None, "chat_template": tokenizer.chat_template,
                "model_max_length": self.context, "vocab_size": self.model.config.vocab_size}  # fmt: skip

    # ---- tokens ------------------------------------------------------------------------------
    async def tokenize(self, body: TokenizeRequest, response: Response) -> dict:
        response.headers.update(ignored_header(body))
        self.limits.model_name(body.model)
        if body.messages is not None:
            offered = ToolUse(body.tools, None, True).offered
            ids = self._render([message_dict(m) for m in body.messages], offered, body.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    async def detokenize(self, body: DetokenizeRequest, response: Response) -> dict:
        response.headers.update(ignored_header(body))
        self.limits.model_name(body.model)
        self.limits.in_vocabulary(body.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # ---- generation --------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.limits.serving(body.model, self.ready)
        try:
            prompts = [self.limits.encode(p, "prompt") for p in body.prompts()]
        except ValueError as e:
            raise errors.APIError(400, str(e), "prompt") from None
        echoes = None
        if body.echo:
            texts = [p if isinstance(p, str) else "" for p in body.prompts()]
            echoes = await self._scored(prompts, body.logprobs, texts)
        return await self._generate(request, body, prompts, body.max_tokens, body.logprobs, chat=False, echoes=echoes)

    async def _scored(self, prompts: list[list[int]], top: int | None, texts: list[str] | None = None) -> list[Echo]:
        """Each prompt with its text (the given text, else its tokens decoded) and, where `top` is
        given, each token's log-probability after those before it (none for the first)."""
        texts = texts or [""] * len(prompts)
        texts = [text or self.tokenizer.decode(ids, False) for text, ids in zip(texts, prompts)]
        scores: list[Score | None] = [None] * len(prompts)
        if top is not None:
            scores = list(await asyncio.gather(*(self._prompt_score(ids, top) for ids in prompts)))
        return [Echo(text, ids, score) for text, ids, score in zip(texts, prompts, scores)]

    async def _prompt_score(self, ids: list[int], top: int) -> Score:
        if len(ids) < 2:
            return Score(0.0, [], True, [], [])
        return await self.scorer.submit((ids[:1], ids[1:], top))

    def _render(self, messages: list[dict], offered: list[tools.Function], generation: bool = True) -> list[int]:
        """A conversation's prompt ids, with the tools offered told to the template in the model's way."""
        template = self.tokenizer.chat_template
        messages, extra = tools.conversation(messages, offered, self.tool_format, template)
        return self.limits.render_chat(messages, generation, **extra)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.limits.serving(body.model, self.ready)
        use, fmt = body.tool_use, self.tool_format
        ids = self._render(body.conversation(), use.offered)
        parser = None
        if use.choice is not None:  # the grammar keeps every call well-formed; the parser reads them
            body.constrain("tools", fmt.constraint(use.functions, use.choice, use.parallel))
            parser = partial(tools.ToolStream, fmt, use.functions, use.parallel)
        max_tokens, logprobs = body.requested_max_tokens, body.num_logprobs
        return await self._generate(request, body, [ids], max_tokens, logprobs, chat=True, parser=parser)

    async def _generate(
        self,
        request: Request,
        body: _Sampling,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
        chat: bool,
        echoes: list[Echo] | None = None,
        parser: Callable[[], tools.ToolStream] | None = None,
    ) -> Response:
        if max_tokens == 0:  # completions with echo: the prompts and their log-probabilities alone
            for ids in prompts:
                self.limits.prompt_fits(ids)
        else:
            jobs = self.limits.jobs(body, prompts, max_tokens, logprobs, self.in_flight)
        scored = None if body.prompt_logprobs is None else await self._scored(prompts, body.prompt_logprobs)
        if max_tokens == 0:
            return self._echo_only(body, prompts, logprobs, echoes or [], scored)
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
            body.continuous_usage,
            echoes,
            body.n,
            scored,
            parser,
        )
        record = Recorder(self.metrics, [len(ids) for ids in prompts], body.n)
        self.in_flight += len(jobs)
        choices = Choices(self.llm, jobs, request_id, self._sequence_done)
        gone = watch_disconnect(request, choices)
        headers = {"X-Request-Id": request_id, **ignored_header(body)}
        timeout, late = self.config.request_timeout, self.config.timeout_message()
        if body.stream:
            chunks = stream(choices, gone, fmt, record, len(jobs), timeout, late)
            return StreamingResponse(
                chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers}
            )
        response = await complete(choices, gone, fmt, record, timeout, late)
        response.headers.update(headers)
        return response

    def _echo_only(
        self,
        body: _Sampling,
        prompts: list[list[int]],
        logprobs: int | None,
        echoes: list[Echo],
        scored: list[Echo] | None,
    ) -> Response:
        """A completions response of echoed prompts and nothing generated (max_tokens 0)."""
        request_id = f"cmpl-{uuid.uuid4().hex}"
        fmt = Formatter(
            request_id, self.config.model_names[0], int(time.time()), False, self.tokens, logprobs is not None,
            body.include_usage, body.continuous_usage, echoes, body.n, scored,
        )  # fmt: skip
        count, used = len(prompts) * body.n, usage(sum(map(len, prompts)), 0, 0)
        headers = {"X-Request-Id": request_id, **ignored_header(body)}
        if body.stream:
            chunks = [fmt.echo_chunk(i, finished=True) for i in range(count)]
            chunks += [fmt.usage_chunk(used)] if body.include_usage else []
            return StreamingResponse(iter([*chunks, DONE]), media_type="text/event-stream", headers=headers)
        return JSONResponse(fmt.response([fmt.choice(i, None) for i in range(count)], used), headers=headers)

    def _sequence_done(self, finished: bool) -> None:
        self.in_flight -= 1
        if not finished:  # the client left, or the grace period after SIGTERM ran out
            self.metrics.finished.labels("abort").inc()

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
        response.headers.update(ignored_header(body))
        self.limits.serving(body.model, self.ready)
        inputs = self.limits.embedding_inputs(body)
        vectors = await asyncio.gather(*(self.embedder.submit(ids) for ids in inputs))
        return embedding_list(vectors, body.encoding_format, self.config.model_names[0], sum(map(len, inputs)))

    async def loglikelihood(self, body: LoglikelihoodRequest, response: Response) -> dict:
        response.headers.update(ignored_header(body))
        self.limits.serving(body.model, self.ready)
        items = self.limits.score_items(body)
        scores = await asyncio.gather(*(self.scorer.submit(item) for item in items))
        tokens = sum(len(c) + len(x) for c, x, _ in items)
        continuations = [x for _, x, _ in items]
        return loglikelihood_list(
            scores, continuations, body.top_logprobs, self.tokens, self.config.model_names[0], tokens
        )
