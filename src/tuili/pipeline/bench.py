"""Speed measurements on tuili's model: prefill throughput, single-stream decode speed, the
throughput of several concurrent requests through the engine, and the peak memory of it all."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tuili.engine.forward import engine_compute_dtype
from tuili.engine.generate import generate
from tuili.engine.offline import LLM
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.sampling import SamplingParams
from tuili.models.model import Model
from tuili.quant.kernel_layer import compute_dtype

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
    # the baseline's batch-1 decode timed in turns with this one (best of the same rounds), if it was
    baseline_decode_tokens_per_second: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def decode_speedup(self, baseline: Speed) -> float:
        """Batch-1 decode against the baseline: against its runs in turns with this one where there
        were any (a shared machine's memory bus drifts over the minutes between stages), else
        against `baseline`'s own measurement."""
        base = self.baseline_decode_tokens_per_second or baseline.decode_tokens_per_second
        return self.decode_tokens_per_second / base


def speed_reference(model: Model, headroom: float = 3.0) -> Model | None:
    """A copy of `model` to time in turns with the stages applied to it in place, or None where
    `headroom` times its size would not fit in the memory available now (Linux: MemAvailable)."""
    available = _available_memory()
    if available is None or headroom * _resident_bytes(model) > available:
        return None
    return copy.deepcopy(model)


def _resident_bytes(model: Model) -> int:
    """The bytes of the model's tensors, each storage once (a tied head shares the embedding's; a
    layer's weights packed for its kernels count by the shapes of their row layout, kept as meta tensors)."""
    storages = {
        id(t) if t.is_meta else t.untyped_storage().data_ptr(): t.numel() * t.element_size()
        if t.is_meta
        else t.untyped_storage().nbytes()
        for t in model.module.state_dict(keep_vars=True).values()
    }
    return sum(storages.values())


def _available_memory() -> int | None:
    return _proc_bytes("/proc/meminfo", "MemAvailable:")


def _proc_bytes(path: str, key: str) -> int | None:
    """A "key: N kB" line of a Linux /proc file, in bytes (None elsewhere)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    return _proc_bytes("/proc/self/status", "VmHWM:")


@torch.no_grad()
def measure_speed(
    model: Model,
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    repeats: int = 5,
    batch_sizes: Sequence[int] = (),
    reference: Model | None = None,
) -> Speed:
    """Best of `repeats` runs (the machine is shared: the minimum time is the least disturbed one;
    five, because a neighbour's burst of memory traffic can outlast three back-to-back decodes).
    `batch_sizes`: also the output tokens/s of that many requests submitted together (each a
    CONCURRENT_PROMPT_TOKENS prompt and `new_tokens` new tokens), through one engine.
    `reference`: a model (the baseline) whose batch-1 decode is timed in turns with this one's (its
    tensors' bytes are left out of the peak memory reported)."""
    vocab = model.config.vocab_size
    # a model with a short context gets the longest prompt that still leaves room to decode
    prompt_tokens = min(prompt_tokens, model.config.max_position_embeddings - new_tokens)
    prompt = torch.randint(3, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    tracked = _reset_peak_rss()
    for warm in (model, reference) if reference is not None else (model,):
        generate(warm, prompt[:16], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    activations = engine_compute_dtype(model.module.dtype)
    prefill, decode, ttft, base = 0.0, 0.0, float("inf"), None
    for _ in range(repeats):
        if reference is not None:
            base = max(base or 0.0, generate(reference, prompt, params).decode_tokens_per_second)
        start = time.perf_counter()
        with compute_dtype(activations):  # as the engine runs prefill (generate below runs on it)
            model.module(torch.tensor([prompt]), last_only=True)
        prefill = max(prefill, prompt_tokens / (time.perf_counter() - start))
        done = generate(model, prompt, params)
        decode = max(decode, done.decode_tokens_per_second)
        ttft = min(ttft, done.time_to_first_token)
    throughput = {b: _concurrent(model, b, new_tokens, repeats) for b in batch_sizes}
    peak = _peak_rss() if tracked else None
    if peak is not None and reference is not None:  # the baseline copy is not this model's footprint
        peak -= _resident_bytes(reference)
    return Speed(prompt_tokens, prefill, new_tokens, decode, ttft, throughput, peak, base)


def _concurrent(model: Model, requests: int, new_tokens: int, repeats: int) -> float:
    """Output tokens/s of `requests` prompts submitted at once (distinct prompts: no prefix reuse)."""
    if requests < 1:
        raise ValueError(f"a batch size is at least 1, got {requests}")
    length = min(CONCURRENT_PROMPT_TOKENS, model.config.max_position_embeddings - new_tokens)
    g = torch.Generator().manual_seed(requests)
    prompts = [torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(requests)]
    per_token = PagedKVCache.bytes_per_token_of(model)
    blocks = requests * -(-(length + new_tokens) // 16)  # the cache these requests need, not the default 2k each
    llm = LLM(model, max_num_seqs=requests, block_size=16, kv_cache_bytes=blocks * 16 * per_token, prefix_caching=False)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        done = llm.generate(prompts, params)
        best = max(best, sum(len(c.token_ids) for c in done) / (time.perf_counter() - start))
    return best
