"""`DynamicBatcher`: gather concurrent requests into one batch, bounded by size and by waiting time.

The user's DynamicBatcher, for work that is one forward pass per input (embeddings, scoring):
the first item opens a batch; it runs when `max_batch_size` items (or `max_batch_tokens` padded
tokens) are in, or `max_wait` seconds after the first arrived, whichever is first. One batch runs
at a time; items arriving meanwhile form the next. Generation does not use it: the engine batches
continuously, token by token.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Item(Generic[T]):
    value: T
    size: int
    future: asyncio.Future


class DynamicBatcher(Generic[T, R]):
    """`await batcher.submit(x)` returns `run([..., x, ...])[i]` for x's place i in its batch.

    run: an async function from a list of items to a list of results of the same length.
    size: an item's cost in tokens (a batch is padded to its longest item: the batch costs
    len(batch) × max size, kept under max_batch_tokens).
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int = 16,
        max_wait: float = 0.005,
        max_batch_tokens: int = 16384,
        size: Callable[[T], int] = lambda item: 1,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait}")
        self.run, self.size = run, size
        self.max_batch_size, self.max_wait, self.max_batch_tokens = max_batch_size, max_wait, max_batch_tokens
        self._pending: deque[_Item] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0  # batches run so far, and their items (for the mean batch size)
        self.items = 0

    async def submit(self, value: T) -> R:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Item(value, self.size(value), future))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            batch = [item for item in batch if not item.future.done()]  # callers that gave up
            if not batch:
                continue
            self.batches, self.items = self.batches + 1, self.items + len(batch)
            try:
                results = await self.run([item.value for item in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except Exception as error:  # noqa: BLE001 - every caller in the batch gets it
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(result)

    async def _collect(self) -> list[_Item]:
        """Wait for a first item, then take more until the batch is full or max_wait has passed."""
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = time.monotonic() + self.max_wait
        while len(self._pending) < self.max_batch_size and time.monotonic() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        batch, longest = [], 0
        while self._pending and len(batch) < self.max_batch_size:
            size = max(longest, self._pending[0].size)
            if batch and (len(batch) + 1) * size > self.max_batch_tokens:
                break  # it opens the next batch
            batch.append(self._pending.popleft())
            longest = size
        return batch
