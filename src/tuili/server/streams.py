"""Running a request's sequences on the engine and assembling what the client gets: one JSON
response, or an SSE stream of chunks. A client that leaves has its sequences aborted; a request past
the time limit is stopped (504, or an error event once the stream has started)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tuili.engine.async_llm import AsyncLLM
from tuili.engine.request import RequestOutput
from tuili.errors import QueueTimeout
from tuili.server.errors import APIError
from tuili.server.limits import Job
from tuili.server.metrics import Metrics
from tuili.server.openai import DONE, Formatter, sse_error, usage

log = logging.getLogger("tuili.server")


class Choices:
    """Runs a request's sequences (prompts × n) on the engine and yields (choice index, output)
    as they arrive. `cancel()` aborts the ones still running and ends the iteration."""

    _END = object()

    def __init__(self, llm: AsyncLLM, jobs: list[Job], request_id: str, on_done: Callable[[bool], None]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = len(jobs)
        self.finished: set[int] = set()
        self.tasks = []
        for index, ids, params in jobs:
            task = asyncio.create_task(self._pump(llm, index, ids, params, f"{request_id}-{index}"))
            # once per sequence, however it ends (a task cancelled before it starts runs no finally)
            task.add_done_callback(lambda _, index=index: on_done(index in self.finished))
            self.tasks.append(task)

    async def _pump(self, llm: AsyncLLM, index: int, ids: list[int], params, rid: str) -> None:
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


def watch_disconnect(request: Request, choices: Choices) -> asyncio.Task:
    """A task that aborts the choices when the client goes away (even before the response starts)."""

    async def disconnected() -> None:  # the body has been read: the next message is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.create_task(disconnected())
    gone.add_done_callback(lambda task: task.cancelled() or choices.cancel())
    return gone


class Recorder:
    """Latency metrics of one request as the client sees them, and its token counts."""

    def __init__(self, metrics: Metrics, prompt_lengths: list[int], n: int):
        self.metrics, self.start, self.prompt_lengths, self.n = metrics, time.perf_counter(), prompt_lengths, n
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

    def so_far(self, index: int, out: RequestOutput | None) -> dict:
        """Choice `index`'s usage up to `out` (None: before its first token), as vLLM's
        continuous usage stats give it: its prompt's tokens and the tokens it has generated."""
        if out is None:
            return usage(self.prompt_lengths[index // self.n], 0, 0)
        return usage(self.prompt_lengths[index // self.n], len(out.token_ids), out.num_cached_tokens)

    def usage(self, outs: list[RequestOutput]) -> dict:
        cached = sum(out.num_cached_tokens for i, out in enumerate(outs) if i % self.n == 0)
        return usage(sum(self.prompt_lengths), sum(len(out.token_ids) for out in outs), cached)


async def complete(
    choices: Choices, gone: asyncio.Task, fmt: Formatter, record: Recorder, timeout: float | None, late: str
) -> Response:
    """The whole response once every choice has finished; 499 if the client left, 504 (`late`) past `timeout`."""
    finals: dict[int, RequestOutput] = {}

    async def collect():
        async for index, out in choices:
            record.output(index, out)
            if out.finished:
                finals[index] = out

    work = asyncio.create_task(collect())
    try:
        await asyncio.wait({work, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():  # the client left, or the time limit ran out: free its sequences
        choices.cancel()
        work.cancel()
        if gone.done() and not gone.cancelled():
            return Response(status_code=499)
        raise APIError(504, late)
    if work.exception() is not None:
        choices.cancel()  # the other choices of a failed request are not wanted
        if isinstance(work.exception(), QueueTimeout):
            record.metrics.queue_timeouts.inc()
            raise APIError(503, str(work.exception()), headers={"Retry-After": "1"})
        raise APIError(500, f"generation failed: {work.exception()}")
    outs = [finals[i] for i in sorted(finals)]
    return JSONResponse(fmt.response([fmt.choice(i, out) for i, out in enumerate(outs)], record.usage(outs)))


async def stream(
    choices: Choices, gone: asyncio.Task, fmt: Formatter, record: Recorder, count: int, timeout: float | None, late: str
) -> AsyncIterator[str]:
    """SSE chunks as tokens arrive, the usage chunk if asked, then [DONE]; errors go in the stream."""
    finals: dict[int, RequestOutput] = {}
    try:
        continuous = fmt.continuous_usage
        for index in range(count):  # chat opens each choice with the role, completions with an echo
            if fmt.chat:
                yield fmt.role_chunk(index, record.so_far(index, None) if continuous else None)
            elif fmt.echoes is not None:
                yield fmt.echo_chunk(index)
        async with asyncio.timeout(timeout):
            async for index, out in choices:
                record.output(index, out)
                if out.finished:
                    finals[index] = out
                chunk = fmt.delta_chunk(index, out, record.so_far(index, out) if continuous else None)
                if chunk is not None:
                    yield chunk
        if len(finals) == count:
            if fmt.include_usage:
                yield fmt.usage_chunk(record.usage([finals[i] for i in sorted(finals)]))
            yield DONE
    except TimeoutError:
        yield sse_error(504, late)
    except QueueTimeout as e:  # the stream had started (headers sent): the refusal is its event
        record.metrics.queue_timeouts.inc()
        yield sse_error(503, str(e))
    except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
        log.exception("a stream failed")
        yield sse_error(500, f"generation failed: {e}")
    finally:
        gone.cancel()
        choices.cancel()
