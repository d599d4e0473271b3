"""`AsyncLLM`: the engine on a background thread, with one asyncio stream per request (for the server).

The engine thread owns the `LLMEngine`: requests and aborts reach it through a thread-safe inbox
and are applied between steps, so a new request joins the running batch at the next step. Each
step's outputs are handed to the event loop of the coroutine that asked for them. Leaving the
`async for` early (a client that disconnected) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tuili.engine.llm import LLMEngine, Prompt
from tuili.engine.request import RequestOutput
from tuili.engine.sampling import SamplingParams
from tuili.models.model import Model


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    """`async for out in llm.generate(prompt, params): ...` yields a `RequestOutput` per new token."""

    def __init__(self, model: Model | str, **engine_options):
        if isinstance(model, str):
            from tuili.models import load
            model = load(model)
        self.model = model
        self.engine = LLMEngine(model, **engine_options)
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: BaseException | None = None  # what stopped the engine thread, if anything
        self._thread = threading.Thread(target=self._run, name="tuili-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: Prompt, params: SamplingParams = SamplingParams(),
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
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
                if isinstance(out, BaseException):
                    raise RuntimeError(f"the engine failed: {out}") from out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Cancel a request; its stream ends with finish_reason "abort"."""
        self._inbox.put(("abort", request_id))

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (running requests end with an error)."""
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
        except BaseException as error:  # noqa: BLE001 - reported to every waiting stream
            self.error = error
        for request_id in list(self._streams):
            self._send(request_id, self.error or RuntimeError("the engine was shut down"))

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
                    self.engine.enqueue(prompt_ids, params, request_id)
            elif message[0] == "abort":
                out = self.engine.abort(message[1])
                if out is not None:
                    self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._send(out.request_id, out)

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
