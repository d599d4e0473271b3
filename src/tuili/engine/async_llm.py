"""`AsyncLLM`: the engine on a background thread, with one asyncio stream per request (for the server).

The engine thread owns the `LLMEngine` and the model: requests, aborts and other work on the model
(`call`, for embeddings and scoring) reach it through a thread-safe inbox and run between steps, so
a new request joins the running batch at the next step and two threads never share the CPU's cores
for one model. Each step's outputs are handed to the event loops that asked for them, one wake-up per
loop per step. Leaving the `async for` early (a client that disconnected) aborts the request and
frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tuili.engine.llm import LLMEngine
from tuili.engine.pacing import DEFAULT_TARGET_ITL
from tuili.engine.prompt import Prompt
from tuili.engine.request import RequestOutput
from tuili.engine.sampling import SamplingParams
from tuili.errors import QueueTimeout, RequestFailed
from tuili.models.model import Model

T = TypeVar("T")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    """`async for out in llm.generate(prompt, params): ...` yields a `RequestOutput` per new token.

    By default the engine runs on a thread of its own. With `own_thread=False` it runs where the
    caller calls `run()` (it returns after `shutdown()`): `tuili serve` runs it on the main thread
    and the HTTP event loop on another, because GNU OpenMP throttles the spinning of a second
    thread's parallel regions once the main thread has had a team of its own (more OpenMP threads
    than cores): measured here, a 2-thread GEMV took 24 µs on the main thread and 68 µs on any
    other thread afterwards, and decoding ran at half speed.
    """

    def __init__(self, model: Model | str, *, own_thread: bool = True, **engine_options):
        engine_options.setdefault("target_itl", DEFAULT_TARGET_ITL)  # a server paces prefill for latency
        if isinstance(model, str):
            from tuili.models import load

            model = load(model)
        self.model = model
        self.engine = LLMEngine(model, **engine_options)
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._running = threading.Event()
        self.error: BaseException | None = None  # what stopped the engine loop, if anything
        self._thread = None
        if own_thread:
            self._thread = threading.Thread(target=self.run, name="tuili-engine", daemon=True)
            self._thread.start()
            self._running.wait()

    async def generate(
        self, prompt: Prompt, params: SamplingParams = SamplingParams(), request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs. Bad requests raise ValueError here, before anything runs."""
        if self.error is not None or self._stop.is_set():
            raise RuntimeError(f"the engine has stopped: {self.error or 'shut down'}")
        prompt_ids = self.engine.prepare(prompt, params)
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._inbox.put(("add", request_id, prompt_ids, params))
        finished = False
        try:
            while not finished:
                out = await stream.queue.get()
                if isinstance(out, RequestFailed):
                    raise out
                if isinstance(out, BaseException):
                    raise RuntimeError(f"the engine failed: {out}") from out
                if out.error is not None:
                    finished = True  # the engine has dropped it: nothing to abort
                    if out.finish_reason == "queue_timeout":
                        raise QueueTimeout(out.error)
                    raise RequestFailed(f"this request failed (the others go on): {out.error}")
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Cancel a request; its stream ends with finish_reason "abort"."""
        self._inbox.put(("abort", request_id))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine thread between two steps (work on the model that is not
        generation: embeddings, scoring, warm-up) and return its result or raise its error."""
        if self.error is not None or self._stop.is_set():
            raise RuntimeError(f"the engine has stopped: {self.error or 'shut down'}")
        future = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", future, fn, args))
        return await future

    @property
    def alive(self) -> bool:
        """The engine loop is running (or, with own_thread=False, has not stopped yet) and has not failed."""
        return not self._stop.is_set() and self.error is None

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine loop (running requests end with an error)."""
        self._stop.set()
        self._inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """The engine loop: apply requests, step, deliver outputs, until `shutdown()`."""
        self._running.set()
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
        except BaseException as error:  # noqa: BLE001 - reported to every waiting stream
            self.error = error
        reason = self.error or RuntimeError("the engine was shut down")
        for request_id in list(self._streams):
            self._send(request_id, reason)
        while True:  # work handed in after the last step will never run: say so to whoever waits
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if message[0] == "call":
                future = message[1]
                future.get_loop().call_soon_threadsafe(
                    _settle, future, None, RuntimeError(f"the engine has stopped: {reason}")
                )

    def _drain(self, block: bool) -> None:
        """Apply queued adds and aborts; when idle, wait for the next one."""
        while True:
            try:
                message = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if message[0] == "add":
                _, request_id, prompt_ids, params = message
                if request_id in self._streams:  # not already abandoned by its caller
                    try:
                        self.engine.enqueue(prompt_ids, params, request_id)
                    except Exception as refused:  # noqa: BLE001 - this request's alone
                        self._send(request_id, RequestFailed(f"the request could not start: {refused}"))
            elif message[0] == "abort":
                out = self.engine.abort(message[1])
                if out is not None:
                    self._deliver([out])
            elif message[0] == "call":
                _, future, fn, args = message
                error: Exception | None
                try:
                    with self.engine.no_grad():
                        result, error = fn(*args), None
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    result, error = None, e
                future.get_loop().call_soon_threadsafe(_settle, future, result, error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop[stream.loop].append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
