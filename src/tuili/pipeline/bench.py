"""Speed measurements on tuili's model: prefill throughput, single-stream decode speed, the
throughput of several concurrent requests through the engine, and the peak memory of it all."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tuili.engine.generate import generate
from tuili.engine.llm import LLM
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.sampling import SamplingParams
from tuili.models.model import Model
from tuili.quant.linear import compute_dtype, engine_compute_dtype

CONCURRENT_PROMPT_TOKENS = 128  # each concurrent request: a prompt this long, then new_tokens


@dataclass(frozen=True)
class Speed:
    prefill_tokens: int
    prefill_tokens_per_second: float
    decode_tokens: int
    decode_tokens_per_second: float  # batch 1, greedy, after the first token
    time_to_first_token: float  # seconds, for a prompt of prefill_tokens
    throughput: dict[int, float] = field(default_factory=dict)  # concurrent requests -> output tokens/s
    peak_memory_bytes: int | None = None  # resident memory high-water mark while measuring (Linux)

    def to_dict(self) -> dict:
        return asdict(self)


def _reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@torch.no_grad()
def measure_speed(model: Model, prompt_tokens: int = 512, new_tokens: int = 64, repeats: int = 5,
                  batch_sizes: Sequence[int] = ()) -> Speed:
    """Best of `repeats` runs (the machine is shared: the minimum time is the least disturbed one;
    five, because a neighbour's burst of memory traffic can outlast three back-to-back decodes).
    `batch_sizes`: also the output tokens/s of that many requests submitted together (each a
    CONCURRENT_PROMPT_TOKENS prompt and `new_tokens` new tokens), through one engine."""
    vocab = model.config.vocab_size
    # a model with a short context gets the longest prompt that still leaves room to decode
    prompt_tokens = min(prompt_tokens, model.config.max_position_embeddings - new_tokens)
    prompt = torch.randint(3, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    tracked = _reset_peak_rss()
    generate(model, prompt[:16], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    activations = engine_compute_dtype(model.module.dtype)
    prefill, decode, ttft = 0.0, 0.0, float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with compute_dtype(activations):  # as the engine runs prefill (generate below runs on it)
            model.module(torch.tensor([prompt]), last_only=True)
        prefill = max(prefill, prompt_tokens / (time.perf_counter() - start))
        done = generate(model, prompt, params)
        decode = max(decode, done.decode_tokens_per_second)
        ttft = min(ttft, done.time_to_first_token)
    throughput = {b: _concurrent(model, b, new_tokens, repeats) for b in batch_sizes}
    return Speed(prompt_tokens, prefill, new_tokens, decode, ttft, throughput, _peak_rss() if tracked else None)


def _concurrent(model: Model, requests: int, new_tokens: int, repeats: int) -> float:
    """Output tokens/s of `requests` prompts submitted at once (distinct prompts: no prefix reuse)."""
    if requests < 1:
        raise ValueError(f"a batch size is at least 1, got {requests}")
    length = min(CONCURRENT_PROMPT_TOKENS, model.config.max_position_embeddings - new_tokens)
    g = torch.Generator().manual_seed(requests)
    prompts = [torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(requests)]
    per_token = PagedKVCache.bytes_per_token_of(model)
    blocks = requests * -(-(length + new_tokens) // 16)  # the cache these requests need, not the default 2k each
    llm = LLM(model, max_num_seqs=requests, block_size=16, kv_cache_bytes=blocks * 16 * per_token,
              prefix_caching=False)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        done = llm.generate(prompts, params)
        best = max(best, sum(len(c.token_ids) for c in done) / (time.perf_counter() - start))
    return best
