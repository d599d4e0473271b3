"""Speculative decoding: a cheap proposer guesses the next few tokens, the model checks them all in
one step, and every guess it agrees with is a token gained.

Exact: greedy requests keep the model's argmax at every position (the output is plain decoding's),
and sampled ones go through rejection sampling (Leviathan et al. 2023, Chen et al. 2023): a draft
token d is kept with probability min(1, p(d) / q(d)), and the first one refused is replaced by a
draw from max(0, p − q), renormalised, so every token follows the model's own distribution p.

The check is a decode step: the last accepted token and each draft run as one-token segments of the
same sequence, so the C++ step and the paged-attention kernel run them, and each draft sees the
keys of the ones before it (a step writes every key before it attends). What the model refuses is
rolled back: its tokens dropped, the blocks that held only them freed, nothing of them in the
prefix cache.

Proposers register themselves (`Proposer.methods`): `ngram`, prompt lookup (the request's own
tokens: the continuation of the last place its latest n-gram occurred, no model at all), and
`draft`, a small model of the same vocabulary (tuili can make one from the target by pruning
and distilling: tuili.distill).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from tuili.engine.blocks import BlockTable, NoFreeBlocks
from tuili.engine.forward import Segment, engine_compute_dtype, packed_forward
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.request import Request
from tuili.engine.sampling import draw, probabilities
from tuili.engine.scheduler import Chunk, Scheduler
from tuili.engine.step import DecodeStep
from tuili.models.lazy import onload_all

CATCH_UP = 16  # a draft model's unseen tokens up to this many run as one-token segments
RECENT = 0.3  # the weight of the last check in a request's moving acceptance


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup) or "draft" (`draft_model`, a tuili Model or what tuili.load
    reads); num_speculative_tokens: drafts checked per step; prompt_lookup_min/max: the n-gram
    lengths looked up, longest first; max_batch: speculate only while at most this many requests
    decode (vLLM's disable_by_batch_size: a full batch already keeps the cores busy, and drafts
    would only add rows)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    draft_model: Any = None
    max_batch: int = 4

    def __post_init__(self):
        if self.method not in Proposer.methods:
            raise ValueError(
                f"unknown speculative method {self.method!r}; choose {', '.join(sorted(Proposer.methods))}"
            )
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                f"prompt lookup needs 1 <= prompt_lookup_min ({self.prompt_lookup_min}) <= "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError('a draft model is given with method "draft", and only then')
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")


@dataclass
class Draft:
    """Proposed tokens, and the distributions they were drawn from (k, V); None: chosen outright
    (prompt lookup, or a greedy draft model), as if each had probability 1."""

    tokens: list[int]
    probs: Tensor | None = None


class Proposer(ABC):
    """Guesses tokens for requests; subclasses register under `method`."""

    method: ClassVar[str]
    methods: ClassVar[dict[str, type[Proposer]]] = {}

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        Proposer.methods[cls.method] = cls

    def __init__(self, config: SpeculativeConfig, engine: Any):
        self.config = config

    @abstractmethod
    def propose(self, requests: list[Request], counts: list[int]) -> list[Draft]:
        """Up to counts[i] tokens to follow each request's tokens (fewer, or none, where it has no guess)."""

    def settled(self, request: Request, kept: int) -> None:  # noqa: B027 - a proposer without state ignores it
        """The model checked a request's drafts: its first `kept` tokens stand."""

    def release(self, request: Request) -> None:  # noqa: B027 - as settled
        """The request has finished: forget it."""


class PromptLookup(Proposer):
    """The tokens that followed the last earlier occurrence of the request's final n tokens, for n
    from prompt_lookup_max down to prompt_lookup_min (vLLM's ngram method, llama.cpp's lookup)."""

    method = "ngram"

    def propose(self, requests: list[Request], counts: list[int]) -> list[Draft]:
        return [Draft(self.lookup(r.all_ids, k)) for r, k in zip(requests, counts)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        ids = np.asarray(tokens)
        size = len(ids)
        for n in range(min(self.config.prompt_lookup_max, size - 1), self.config.prompt_lookup_min - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[: size - 1], n)  # each ends before the last token
            found = np.flatnonzero((windows == ids[size - n :]).all(axis=1))
            if found.size:
                start = int(found[-1]) + n
                return ids[start : start + k].tolist()
        return []


class DraftModel(Proposer):
    """A small model of the same vocabulary writes the drafts, one token a step for k steps, all the
    requests that speculate batched together; its own paged cache keeps each request's keys, and
    what the target refuses is rolled back there too. Greedy requests take its argmax; sampled
    ones draw from its distribution under the request's own settings (the q of `verify`)."""

    method = "draft"

    def __init__(self, config: SpeculativeConfig, engine: Any):
        super().__init__(config, engine)
        model = config.draft_model
        if isinstance(model, str):
            from tuili.models import load

            model = load(model)
        vocab, target = model.config.vocab_size, engine.model.config.vocab_size
        if vocab != target:
            raise ValueError(
                f"the draft model's vocabulary ({vocab} tokens) is not the target's ({target}): "
                "a draft must share the target's tokenizer"
            )
        onload_all(model.module)
        self.model, self.module = model, model.module
        dtype = PagedKVCache.dtype_for(model.config, self.module.dtype)
        self.cache = PagedKVCache(model.config, engine.cache.allocator.num_blocks, engine.cache.block_size, dtype)
        self.decode_step = DecodeStep(self.module) if engine.fast_decode else None
        self.compute_dtype = engine_compute_dtype(self.module.dtype, engine.compute_dtype == torch.bfloat16)
        self.tables: dict[str, BlockTable] = {}
        self.computed: dict[str, int] = {}  # request id -> leading tokens whose keys this cache holds

    def propose(self, requests: list[Request], counts: list[int]) -> list[Draft]:
        drafts = [Draft([]) for _ in requests]
        live: list[int] = []
        for i, (request, k) in enumerate(zip(requests, counts)):
            table = self.tables.setdefault(request.id, self.cache.new_sequence())
            try:
                table.append(len(request.all_ids) + k - 1)  # the tokens so far and every draft but the last
            except NoFreeBlocks:
                continue
            live.append(i)
        if not live:
            return drafts
        dists: dict[int, list[Tensor]] = {i: [] for i in live}
        with torch.inference_mode():
            # first the tokens this cache has not seen (a prompt, the last accepted ones), then one a step
            pending = [self._pending(requests[i]) for i in live]
            for step in range(max(counts[i] for i in live)):
                if step:
                    live = [i for i in live if len(drafts[i].tokens) < counts[i]]
                    pending = [[(self.tables[requests[i].id], len(requests[i].all_ids) + step - 1, 1)] for i in live]
                segments = [seg for segs in pending for seg in segs]
                ids = [
                    t
                    for i, segs in zip(live, pending)
                    for seg in segs
                    for t in self._tokens(requests[i], drafts[i], seg)
                ]
                ends = list(itertools.accumulate(sum(n for _, _, n in segs) for segs in pending))
                logits, _ = packed_forward(
                    self.module, self.decode_step, self.cache, segments, ids, [e - 1 for e in ends], self.compute_dtype
                )
                for row, i in enumerate(live):
                    token, probs = self._pick(logits[row : row + 1], requests[i])
                    drafts[i].tokens.append(token)
                    if probs is not None:
                        dists[i].append(probs)
        for i, draft in enumerate(drafts):
            if draft.tokens:
                self.computed[requests[i].id] = len(requests[i].all_ids) + len(draft.tokens) - 1
                self.tables[requests[i].id].truncate(self.computed[requests[i].id])
                draft.probs = torch.cat(dists[i]) if dists.get(i) else None
        return drafts

    def _pending(self, request: Request) -> list[Segment]:
        """The request's tokens this cache has not seen: a few (the last check's) as one-token
        segments, so that the step stays a decode step the C++ step runs; a prompt as one chunk."""
        table = self.tables[request.id]
        done = min(self.computed.get(request.id, 0), len(request.all_ids) - 1)
        n = len(request.all_ids) - done
        return [(table, p, 1) for p in range(done, done + n)] if n <= CATCH_UP else [(table, done, n)]

    @staticmethod
    def _tokens(request: Request, draft: Draft, segment: Segment) -> list[int]:
        """A segment's token ids: the request's own, then its drafts so far."""
        _, start, n = segment
        known = request.all_ids + draft.tokens
        return known[start : start + n]

    @staticmethod
    def _pick(logits: Tensor, request: Request) -> tuple[int, Tensor | None]:
        params = request.params
        if params.greedy:
            return int(logits.argmax(dim=-1)[0]), None
        probs = probabilities(logits, params)
        return int(draw(probs, request.generator)[0]), probs

    def settled(self, request: Request, kept: int) -> None:
        table = self.tables.get(request.id)
        if table is not None:
            self.computed[request.id] = min(kept, self.computed.get(request.id, 0))
            table.truncate(min(table.num_tokens, self.computed[request.id]))

    def release(self, request: Request) -> None:
        table = self.tables.pop(request.id, None)
        if table is not None:
            table.free()
        self.computed.pop(request.id, None)


def verify(logits: Tensor, draft: Draft, params: Any, generator: torch.Generator) -> list[int]:
    """The tokens a speculative step yields: the drafts the model accepts, then one of its own (the
    replacement of the first it refused, or the token after the last). `logits` (k + 1, V): the
    model's at the last accepted token and at each draft."""
    drafts = draft.tokens
    if params.greedy:
        best = logits.argmax(dim=-1).tolist()
        kept = next((i for i, (d, b) in enumerate(zip(drafts, best)) if d != b), len(drafts))
        return [*drafts[:kept], best[kept]]
    probs = probabilities(logits, params)
    chance = torch.rand(len(drafts), generator=generator, dtype=torch.float64, device=logits.device).tolist()
    for i, token in enumerate(drafts):
        p = float(probs[i, token])
        q = 1.0 if draft.probs is None else float(draft.probs[i, token])
        if chance[i] * q < p:  # kept with probability min(1, p / q)
            continue
        if draft.probs is None:
            residual = probs[i].clone()
            residual[token] = 0.0
        else:
            residual = (probs[i] - draft.probs[i]).clamp_min(0.0)
        if not float(residual.sum()) > 0:  # p ≤ q nowhere: only where p = q, which keeps every draft
            residual = probs[i]
        return [*drafts[:i], int(draw(residual[None], generator)[0])]
    return [*drafts, int(draw(probs[-1:], generator)[0])]


class Speculator:
    """Speculative decoding in an engine: drafts added to the step's decode chunks, and each
    speculative chunk's tokens checked once the step has run."""

    def __init__(self, config: SpeculativeConfig, engine: Any):
        self.config = config
        self.proposer = Proposer.methods[config.method](config, engine)
        self.steps = self.proposed = self.accepted = 0  # speculative chunks, drafts checked, drafts kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def extend(self, chunks: list[Chunk], scheduler: Scheduler, max_rows: int) -> list[Chunk]:
        """The step's chunks with drafts behind the decodes of requests that can take them: no
        penalties and no grammar (each position would need its own), room in their blocks (a draft
        never preempts), at most max_batch decoding, at most `max_rows` rows in the step."""
        decodes = [i for i, c in enumerate(chunks) if c.length == 1 and c.samples]
        if not decodes or len(decodes) > self.config.max_batch:
            return chunks
        rows = sum(c.length for c in chunks if c.length == 1)
        eligible, counts = [], []
        for i in decodes:
            request = chunks[i].request
            # as many drafts as the recent acceptance pays for: a request whose guesses fail gets one a
            # step (two rows cost what one does), and more again as they succeed
            wanted = max(1, round(self.config.num_speculative_tokens * request.accepting))
            room = min(wanted, request.params.max_tokens - len(request.output_ids) - 1)
            room = min(room, (max_rows - rows) // max(1, len(decodes)))
            if room > 0 and request.guide is None and not request.params.penalized:
                eligible.append(i)
                counts.append(room)
        if not eligible:
            return chunks
        drafts = self.proposer.propose([chunks[i].request for i in eligible], counts)
        chunks = list(chunks)
        for i, draft in zip(eligible, drafts):
            chunk, tokens = chunks[i], draft.tokens
            request = chunk.request
            if not tokens or request.table is None:
                continue
            try:
                scheduler.copies += request.table.append(chunk.start + 1 + len(tokens))
            except NoFreeBlocks:
                continue
            request.all_ids += tokens
            request.draft = draft
            chunks[i] = Chunk(request, chunk.start, 1 + len(tokens), tuple(tokens))
        return chunks

    def check(self, chunk: Chunk, logits: Tensor) -> list[int]:
        """A speculative chunk's tokens, from the model's logits at its k + 1 positions; its drafts
        leave the request's tokens (the accepted ones come back as the tokens returned)."""
        request = chunk.request
        draft, request.draft = request.draft, None
        assert draft is not None and tuple(draft.tokens) == chunk.drafts
        del request.all_ids[chunk.start + 1 :]
        tokens = verify(logits, draft, request.params, request.generator)
        self.steps += 1
        self.proposed += len(chunk.drafts)
        self.accepted += len(tokens) - 1
        request.accepting = (1 - RECENT) * request.accepting + RECENT * (len(tokens) - 1) / len(chunk.drafts)
        return tokens

    def settled(self, request: Request, kept: int) -> None:
        self.proposer.settled(request, kept)

    def release(self, request: Request) -> None:
        self.proposer.release(request)

    def stats(self) -> dict[str, float]:
        return {
            "spec_steps": self.steps,
            "spec_draft_tokens": self.proposed,
            "spec_accepted_tokens": self.accepted,
        }
