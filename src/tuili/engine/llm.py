"""The engine: requests in, one packed forward step at a time over the paged KV cache, outputs out.

`LLMEngine` is the synchronous core (add_request / step / abort); `LLM` (tuili.engine.offline) is
the offline API on top of it in vLLM's shape; `AsyncLLM` (tuili.engine.async_llm) runs the same
core on a thread for the server.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from functools import cached_property
from typing import Any, cast

import torch
from torch import Tensor

from tuili.engine.detokenize import OutputText
from tuili.engine.forward import Segment, engine_compute_dtype, packed_forward
from tuili.engine.pacing import StepPacer
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.prompt import Prompt, encode_prompt
from tuili.engine.request import Request, RequestOutput
from tuili.engine.sampling import SamplingParams, TokenLogprob, apply_penalties, sample, token_logprobs
from tuili.engine.scheduler import Chunk, Scheduler
from tuili.engine.speculative import SpeculativeConfig, Speculator
from tuili.engine.step import DecodeStep
from tuili.engine.structured import Grammars
from tuili.kernels import ops as kernels
from tuili.models.lazy import onload_all
from tuili.models.memory import return_freed_memory
from tuili.models.model import Model
from tuili.quant.kernel_layer import KernelLinear

log = logging.getLogger("tuili.engine")
MAX_DEFAULT_KV_BYTES = 4 << 30
DEFAULT_KV_TOKENS_PER_SEQ = 2048


class LLMEngine:
    """Continuous batching over a paged KV cache for one model.

    max_num_seqs: requests decoding together; max_num_batched_tokens: tokens per step (prefill
    chunks and decodes together); target_itl: seconds a step should take while requests decode
    (the latency/throughput knob: prompt chunks beside decodes are sized from measured step times
    to keep within it, see tuili.engine.pacing; None, the default here: every step takes up to
    max_num_batched_tokens, throughput first, as offline batches want; AsyncLLM, the server's
    engine, paces to 50 ms by default); max_queue_time: seconds a request may wait for a place in the running batch;
    past it, it ends unstarted with finish_reason "queue_timeout" (the server answers 503), so that
    under overload time to first token stays bounded (None: it waits as long as it takes);
    kv_cache_bytes: the cache's memory (default: 2,048 tokens per
    sequence, or one full context if larger, at most 4 GiB); kv_cache_dtype: what the cache stores,
    "float32", "bfloat16" or "int8" (default "auto": the model's own choice, set by
    tuili.quant.quantize_kv_cache_, else its dtype); threads: torch's intra-op threads;
    bf16_activations: weight-only quantized layers (W8A16, W4A16) take their activations in bf16
    (fp32 accumulation): prefill chunks as a bf16 GEMM, decode steps in tuili's AVX512-BF16
    kernels; about 3× faster at prefill and at 16 rows where the CPU has AVX512-BF16 or AMX, the
    default there. fp32 and bf16 models are unaffected.
    kernels: False runs every op on its PyTorch path (`tuili.kernels.fallback()` around each step:
        for comparisons; tuili's kernels are what make decoding fast).
    seed: seeds the requests that bring no seed of their own (`tuili serve --seed`), so that a run
        of the same requests in the same order samples the same tokens (None: fresh entropy).
    speculative: speculative decoding (tuili.engine.speculative): drafts checked in each decode step.
    fast_decode: steps of one token per sequence run as one C++ call (tuili.engine.step) where the
        kernels are built and every layer has one; the module forward otherwise, and with False.
        The model must not change while requests run: a new module, packed weights or hook is
        picked up when the next request is added.
    """

    def __init__(
        self,
        model: Model,
        *,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 512,
        target_itl: float | None = None,
        max_queue_time: float | None = None,
        block_size: int = 16,
        kv_cache_bytes: int | None = None,
        kv_cache_dtype: str | None = None,
        prefix_caching: bool = True,
        threads: int | None = None,
        bf16_activations: bool | None = None,
        fast_decode: bool = True,
        kernels: bool = True,
        seed: int | None = None,
        speculative: SpeculativeConfig | None = None,
    ):
        if max_queue_time is not None and not max_queue_time > 0:
            raise ValueError(f"max_queue_time must be a positive number of seconds (or None), got {max_queue_time}")
        self.max_queue_time = max_queue_time
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        self.model, self.module = model, model.module
        onload_all(self.module)  # a lazily loaded model's remaining layers: serving needs them all
        config = model.config
        dtype = self.module.dtype
        kv_dtype = PagedKVCache.dtype_for(config, dtype, kv_cache_dtype)
        if kv_cache_bytes is None:
            per_token = PagedKVCache.bytes_per_token(config, kv_dtype)
            context = config.max_position_embeddings
            tokens = max(context, max_num_seqs * min(context, DEFAULT_KV_TOKENS_PER_SEQ))
            kv_cache_bytes = min(MAX_DEFAULT_KV_BYTES, tokens * per_token)
        self.cache = PagedKVCache.from_budget(config, kv_cache_bytes, block_size, kv_dtype)
        self.scheduler = Scheduler(
            self.cache, max_num_seqs, max_num_batched_tokens, prefix_caching, StepPacer(target_itl)
        )
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seeds = random.Random(seed) if seed is not None else None  # for requests that bring none
        self.compute_dtype = engine_compute_dtype(dtype, bf16_activations)
        self.fast_decode, self.kernels = fast_decode, kernels
        self.decode_step = DecodeStep(self.module)
        self.speculator = Speculator(speculative, self) if speculative is not None else None
        self._check_model = True  # look again whether the fast decode paths' plans fit the model
        # inference_mode saves per-op bookkeeping; tensor-subclass weights (quanto, torchao) refuse it
        plain = all(
            type(t) in (torch.Tensor, torch.nn.Parameter) for t in self.module.state_dict(keep_vars=True).values()
        )
        self.no_grad = torch.inference_mode if plain else torch.no_grad
        if kernels:  # the module forward runs the same kernel calls as the C++ step
            self._make_kernel_calls()

    def _make_kernel_calls(self) -> None:
        """Each quantized layer's kernel call made now, packing its weights for the kernels, rather
        than inside the first request; the packing's scratch memory (about the weights' size again,
        freed in pieces the allocator keeps) given back to the system. Not where the kernels are
        forced off (`fallback()`): a call made there would be cached without its packing."""
        if kernels.extension() is None:
            return
        bf16 = torch.bfloat16 in (self.compute_dtype, self.module.dtype)
        for m in self.module.modules():
            if isinstance(m, KernelLinear):
                m.kernel_call(bf16)
        return_freed_memory()

    @property
    def max_tokens_per_request(self) -> int:
        return min(self.model.config.max_position_embeddings, self.cache.allocator.num_blocks * self.cache.block_size)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, with what to change, for a request the engine can never run."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), the model's vocabulary")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias names token {max(params.logit_bias)}; the vocabulary is [0, {vocab})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.model.config.max_position_embeddings:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the model's context of {self.model.config.max_position_embeddings} tokens"
            )
        if total > self.max_tokens_per_request:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) needs more "
                f"KV cache than the engine has ({self.max_tokens_per_request} tokens): "
                f"give it a larger kv_cache_bytes or ask for fewer tokens"
            )
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)  # compiled once, cached for enqueue

    @cached_property
    def grammars(self) -> Grammars:
        """The structured-output grammars of this model's vocabulary (built on first use)."""
        model = self.model
        return Grammars(model.tokenizer.backend.to_str(), model.config.vocab_size, model.eos_token_ids)

    def prepare(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """The prompt's token ids, checked (ValueError, with what to change, if it can never run)."""
        prompt_ids = encode_prompt(self.model, prompt)
        self.validate(prompt_ids, params)
        return prompt_ids

    def add_request(
        self, prompt: Prompt, params: SamplingParams = SamplingParams(), request_id: str | None = None
    ) -> str:
        """Queue a request; it joins the running batch at the next step with room for it."""
        return self.enqueue(self.prepare(prompt, params), params, request_id)

    def enqueue(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue token ids that `prepare` returned."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        generator = torch.Generator(device=self.module.device)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63) if self._seeds else torch.seed()
        generator.manual_seed(seed)  # negatives wrap to 2**64
        stop_ids = (set() if params.ignore_eos else set(self.model.eos_token_ids)) | set(params.stop_token_ids)
        request = Request(
            request_id, prompt_ids, params, OutputText(self.model.tokenizer, params.stop, stop_ids), generator
        )
        if params.structured_outputs is not None:
            request.guide = self.grammars.guide(params.structured_outputs)
        self.requests[request_id] = request
        self.scheduler.add(request)
        self._check_model = True  # a change to the model between requests is picked up from here
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; its blocks are freed at once. None if it is unknown or finished."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        return self._finish(request, "abort", request.text.finish(), 0)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one forward over the scheduled chunks; sample where a chunk completes a request's
        pending tokens. Returns an output for every request that got a token (or finished).

        Faults are of two kinds. One in a request's own work (its penalties, sampling, log-probabilities,
        detokenization, stop strings) ends that request alone: it finishes with finish_reason "error"
        and its `error`, its blocks are freed, and the batch goes on. One in the shared work (scheduling,
        the batched forward, the KV cache's blocks) may have left shared state half-written: it is raised
        from here, and whoever runs the engine stops it (`tuili serve` then exits non-zero).
        """
        late = self._expire_queued()
        chunks = self.scheduler.schedule()
        if not chunks:
            return late
        if self.speculator is not None:
            chunks = self.speculator.extend(chunks, self.scheduler, self.decode_step.max_rows(self.compute_dtype))
        start = time.perf_counter()
        with self.no_grad(), kernels.fallback(not self.kernels):
            self.cache.copy_blocks(self.scheduler.take_copies())
            outputs = self._sample(chunks, self._forward(chunks))
        decodes = sum(c.length for c in chunks if c.length == 1 or c.drafts)  # rows of the decode kernels
        self.scheduler.pacer.observe(decodes, sum(c.length for c in chunks) - decodes, time.perf_counter() - start)
        return late + outputs

    def _sample(self, chunks: list[Chunk], logits: Tensor) -> list[RequestOutput]:
        """Every sampling chunk's next token (greedy ones in one argmax, every grammar's mask at
        once), and each speculative chunk's checked tokens."""
        plain: list[tuple[Request, int]] = []
        speculative: list[tuple[Chunk, int]] = []
        row = 0
        for chunk in chunks:
            if chunk.drafts:
                speculative.append((chunk, row))
                row += chunk.length
                continue
            self.scheduler.computed(chunk)
            if chunk.samples:
                plain.append((chunk.request, row))
                row += 1
        sampling = [request for request, _ in plain]
        rows = logits[[i for _, i in plain]] if speculative else logits
        greedy = self._greedy_tokens(sampling, rows)
        allowed = self._allowed_tokens(sampling)
        outputs = [
            self._advance(request, rows[i : i + 1], greedy.get(i), allowed.get(i)) for i, request in enumerate(sampling)
        ]
        return outputs + [self._speculated(chunk, logits[i : i + chunk.length]) for chunk, i in speculative]

    def _expire_queued(self) -> list[RequestOutput]:
        """End the requests that have waited past max_queue_time without ever starting."""
        late = self.scheduler.expired(self.max_queue_time) if self.max_queue_time is not None else []
        return [self._finish(request, "queue_timeout", "", 0) for request in late]

    def _forward(self, chunks: list[Chunk]) -> Tensor:
        """Logits at every chunk's sampled positions: its last token, or each of a speculative
        chunk's (the last accepted token and every draft, each a one-token segment of the same
        sequence, so that the step stays a decode step)."""
        ids: list[int] = []
        segments: list[Segment] = []
        sample_at: list[int] = []
        for chunk in chunks:
            table = chunk.request.table
            assert table is not None, "a scheduled request holds its blocks"
            end = chunk.start + chunk.length
            ids += chunk.request.all_ids[chunk.start : end]
            if chunk.drafts:
                segments += [(table, p, 1) for p in range(chunk.start, end)]
                sample_at += range(len(ids) - chunk.length, len(ids))
            else:
                segments.append((table, chunk.start, chunk.length))
                if chunk.samples:
                    sample_at.append(len(ids) - 1)
        step = self.decode_step if self.fast_decode else None
        logits, fast = packed_forward(
            self.module, step, self.cache, segments, ids, sample_at, self.compute_dtype, self._check_model
        )
        if fast:
            self._check_model = False
        return logits

    def _greedy_tokens(self, requests: list[Request], logits: Tensor) -> dict[int, int]:
        """The next token of every plain greedy request (row index -> token), in one argmax."""
        plain = [i for i, r in enumerate(requests) if r.params.greedy and not r.params.penalized and r.guide is None]
        if not plain:
            return {}
        rows = logits if len(plain) == len(requests) else logits[plain]
        return dict(zip(plain, kernels.argmax(rows).tolist()))

    def _allowed_tokens(self, requests: list[Request]) -> dict[int, Tensor]:
        """Row index -> the tokens its grammar allows next, for every structured-output request
        (all masks of the step computed together)."""
        guided = [i for i, r in enumerate(requests) if r.guide is not None]
        if not guided:
            return {}
        masks = self.grammars.masks([cast(Any, requests[i].guide) for i in guided])
        return {i: masks[j] for j, i in enumerate(guided)}

    def _advance(self, request: Request, row: Tensor, greedy: int | None, allowed: Tensor | None) -> RequestOutput:
        """Give a request its next token (sampled from its logits `row` unless `greedy` is given, among
        the `allowed` tokens where it follows a grammar); a failure in this request's own work
        finishes it with finish_reason "error"."""
        try:
            pick = self._pick(request, row, greedy, allowed)
        except Exception as error:  # noqa: BLE001 - this request's alone: it ends, the batch goes on
            return self._failed(request, error)
        return self._append(request, [pick])

    def _speculated(self, chunk: Chunk, logits: Tensor) -> RequestOutput:
        """A speculative chunk's request given the tokens its check yields (logits: at its k + 1
        positions); the KV of the drafts it refused rolled back."""
        request = chunk.request
        assert self.speculator is not None
        try:
            tokens = self.speculator.check(chunk, logits)
            top = request.params.logprobs
            logprobs = (
                [None] * len(tokens)
                if top is None
                else token_logprobs(logits[: len(tokens)], torch.tensor(tokens), top)
            )
        except Exception as error:  # noqa: BLE001 - this request's alone, as in _advance
            return self._failed(request, error)
        out = self._append(request, list(zip(tokens, logprobs)))
        if not out.finished:  # the last accepted token and the drafts kept have their keys in place
            self.scheduler.settled(request, chunk.start + len(tokens))
            self.speculator.settled(request, chunk.start + len(tokens))
        return out

    def _append(self, request: Request, picks: list[tuple[int, TokenLogprob | None]]) -> RequestOutput:
        """Add tokens to a request until one finishes it (a stop, its grammar's end, max_tokens)."""
        delta = ""
        for n, (token, logprob) in enumerate(picks, 1):
            try:
                text, reason = request.append(token, logprob)
            except Exception as error:  # noqa: BLE001 - this request's alone: it ends, the batch goes on
                return self._failed(request, error)
            delta += text
            if reason is not None:
                return self._finish(request, reason, delta, n)
        return RequestOutput.of(request, delta, len(picks))

    def _failed(self, request: Request, error: Exception) -> RequestOutput:
        log.exception("request %s failed; it is aborted and the others go on", request.id, exc_info=error)
        request.error = f"{type(error).__name__}: {error}"
        return self._finish(request, "error", "", 0)

    def _pick(
        self, request: Request, row: Tensor, greedy: int | None, allowed: Tensor | None
    ) -> tuple[int, TokenLogprob | None]:
        """The next token of one request, with its log-probabilities if asked for (the model's own,
        after penalties and before a grammar's mask, as vLLM reports them)."""
        params = request.params
        if params.penalized:
            row = apply_penalties(row, params, [request.prompt_ids], [request.output_ids])
        if greedy is not None:
            token = greedy
        else:
            masked = row if allowed is None else row.masked_fill(~allowed[: row.shape[-1]], float("-inf"))
            token = int(sample(masked, params, request.generator)[0])
        logprob = None
        if params.logprobs is not None:
            logprob = token_logprobs(row, torch.tensor([token]), params.logprobs)[0]
        return token, logprob

    def _finish(self, request: Request, reason: str, delta: str, new_tokens: int) -> RequestOutput:
        self.scheduler.finish(request)
        if self.speculator is not None:
            self.speculator.release(request)
        request.finish_reason, request.finished_time = reason, time.perf_counter()
        del self.requests[request.id]
        if not self.requests:  # idle: let go of the weights the C++ step's plan holds
            self.decode_step.release()
        return RequestOutput.of(request, delta, new_tokens)

    def stats(self) -> dict[str, float]:
        """Gauges and counters for metrics: the scheduler's (policy, pacer, queues, KV and prefix
        cache), the queue-time limit, and speculative decoding's drafts where it is on."""
        return {
            **self.scheduler.stats(),
            "max_queue_time": self.max_queue_time or 0.0,
            **(self.speculator.stats() if self.speculator is not None else {}),
        }
