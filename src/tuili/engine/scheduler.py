"""Iteration-level (continuous) batching: which tokens of which requests the next step computes.

Every step has a token budget. Decoding requests come first, one token each, in the order they
were admitted; then the requests still prefilling get the rest of their prompts, chunked to the
prefill budget the pacer allows beside those decodes (tuili.engine.pacing: a long prompt is split
across steps so that the decoding streams keep their pace). Then waiting requests are admitted
first-come first-served while that budget, the sequence limit and the KV blocks allow; a new
request first takes what the prefix cache holds of its prompt.
When a running request needs a block and none is free, unreferenced prefix-cache blocks are
evicted; if that is not enough, the last request in that order (one still prefilling, else the
most recently admitted) is preempted: its blocks are freed and it goes back to the front of the
queue with its tokens so far, to be recomputed (vLLM's recompute preemption). Nothing is lost: a
preempted request resumes where it stopped.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from tuili.engine.blocks import NoFreeBlocks
from tuili.engine.pacing import StepPacer
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.prefix import PrefixCache
from tuili.engine.request import Request, Status


@dataclass(frozen=True)
class Chunk:
    """`length` tokens of `request`, from position `start`, computed in this step. A speculative
    chunk is a decode followed by `drafts` (appended to the request's tokens for this step only):
    the model checks them all at once, and what it rejects is rolled back (`settled`)."""

    request: Request
    start: int
    length: int
    drafts: tuple[int, ...] = ()

    @property
    def samples(self) -> bool:
        """The chunk reaches the request's last token, so its logits give the next one."""
        return self.start + self.length == len(self.request.all_ids)


class Scheduler:
    def __init__(
        self,
        cache: PagedKVCache,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 512,
        prefix_caching: bool = True,
        pacer: StepPacer | None = None,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.cache = cache
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.pacer = pacer if pacer is not None else StepPacer(target_itl=None)
        self.prefix = PrefixCache(cache.allocator, cache.block_size) if prefix_caching else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.copies: list[tuple[int, int]] = []  # copy-on-write block copies the cache must make
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        """The next step's chunks: one-token chunks (decodes) first, then paced prefill chunks."""
        # decoding requests first (a stable partition: admission order within each kind), so a
        # prompt being prefilled never takes the budget of a stream that waits for its next token
        self.running.sort(key=lambda r: r.num_pending != 1)
        decodes = sum(1 for r in self.running if r.num_pending == 1)
        budget, chunks, preemptions = self.max_num_batched_tokens, [], self.num_preemptions
        prefill = self.pacer.prefill_budget(min(decodes, budget), budget - min(decodes, budget))
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = 1 if request.num_pending == 1 else min(request.num_pending, budget, prefill)
            if n < 1:
                break  # prefill's share of this step is spent
            if not self._make_room(request, request.num_computed + n):
                break  # it was the last one left to preempt
            chunks.append(Chunk(request, request.num_computed, n))
            budget -= n
            if request.num_pending > 1:
                prefill -= n
            i += 1
        preempted = self.num_preemptions > preemptions
        while self.waiting and min(budget, prefill) > 0 and len(self.running) < self.max_num_seqs and not preempted:
            request = self.waiting[0]
            if request.table is None:
                request.table = self.prefix.match(request.all_ids) if self.prefix else self.cache.new_sequence()
                request.num_computed = request.table.num_tokens
                request.num_cached = max(request.num_cached, min(request.num_computed, len(request.prompt_ids)))
            n = min(request.num_pending, budget, prefill)
            if not self._grow(request, request.num_computed + n):
                # a waiting request holds no blocks: held, the prefix it matched could be what the
                # requests ahead of it need (a preempted one goes back to the front of the queue),
                # and with every block held by waiting requests nothing would ever run again
                self._release(request)
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            if request.scheduled_time is None:
                request.scheduled_time = time.perf_counter()
            self.running.append(request)
            chunks.append(Chunk(request, request.num_computed, n))
            budget -= n
            prefill -= n
        return sorted(chunks, key=lambda c: c.length != 1)  # stable: decodes first, in order

    def computed(self, chunk: Chunk) -> None:
        """The step ran: the chunk's keys and values are in the cache."""
        request = chunk.request
        request.num_computed = chunk.start + chunk.length
        if self.prefix is not None and request.table is not None:
            self.prefix.insert(request.table, request.all_ids, request.block_keys)

    def settled(self, request: Request, num_computed: int) -> None:
        """A speculative chunk was checked: the request's KV is valid for its first `num_computed`
        tokens, and the blocks that held only rejected drafts are freed."""
        assert request.table is not None, "a running request holds its block table"
        request.table.truncate(num_computed)
        request.num_computed = num_computed
        if self.prefix is not None:
            self.prefix.insert(request.table, request.all_ids, request.block_keys)

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request and free its blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        request.status = Status.FINISHED

    def expired(self, max_queue_time: float) -> list[Request]:
        """The requests that have waited past `max_queue_time` seconds without ever starting, each
        with the error that says so (the engine ends them)."""
        now = time.perf_counter()
        late = [r for r in self.waiting if r.scheduled_time is None and now - r.arrival > max_queue_time]
        for request in late:
            request.error = (
                f"the request waited {now - request.arrival:.1f} s for a place in the running batch, past this "
                f"engine's limit of {max_queue_time:g} s: the server is overloaded; retry later"
            )
        return late

    def stats(self) -> dict[str, float]:
        """The scheduling policy and what the pacer has measured, queue lengths, KV use (blocks
        requests hold; blocks only the prefix cache holds are counted apart), prefix-cache hits,
        preemptions."""
        allocator, prefix, pacer = self.cache.allocator, self.prefix, self.pacer
        cached = prefix.num_evictable() if prefix else 0  # reusable, but free for the taking
        decodes = min(len(self.running), self.max_num_seqs)
        return {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "target_itl": pacer.target_itl or 0.0,
            "prefill_budget": pacer.prefill_budget(decodes, self.max_num_batched_tokens - decodes),
            "decode_step_seconds": pacer.decode_time or 0.0,
            "prefill_token_seconds": pacer.token_time or 0.0,
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_blocks_total": allocator.num_blocks,
            "kv_usage": 1 - (allocator.num_free + cached) / allocator.num_blocks,
            "kv_cached_blocks": cached,
            "prefix_cache_queries": prefix.queries if prefix else 0,
            "prefix_cache_hits": prefix.hits if prefix else 0,
            "preemptions": self.num_preemptions,
        }

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.copies = self.copies, []
        return copies

    def _make_room(self, request: Request, num_tokens: int) -> bool:
        """Grow a running request, preempting from the back of the running list until it fits.
        False when the request itself had to be preempted."""
        while not self._grow(request, num_tokens):
            victim = self.running.pop()  # the most recently admitted
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Make room for `num_tokens` in the request's blocks, evicting cached prefixes if needed."""
        table = request.table
        assert table is not None, "a running request holds its block table"
        short = table.blocks_needed(num_tokens) - self.cache.allocator.num_free
        if short > 0 and self.prefix is not None:
            self.prefix.evict(short)
        try:
            self.copies += table.append(num_tokens)
        except NoFreeBlocks:
            return False
        return True

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        if request.table is not None:
            request.table.free()
        request.table, request.num_computed, request.block_keys = None, 0, []
