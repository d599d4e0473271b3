"""Speed measurements on tuili's model: prefill throughput and single-stream decode speed."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from tuili.engine.generate import generate
from tuili.engine.sampling import SamplingParams
from tuili.models.model import Model
from tuili.quant.linear import bf16_is_fast, compute_dtype


@dataclass(frozen=True)
class Speed:
    prefill_tokens: int
    prefill_tokens_per_second: float
    decode_tokens: int
    decode_tokens_per_second: float  # batch 1, greedy, after the first token
    time_to_first_token: float  # seconds, for a prompt of prefill_tokens

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def measure_speed(model: Model, prompt_tokens: int = 512, new_tokens: int = 64, repeats: int = 3) -> Speed:
    """Best of `repeats` runs (the machine is shared: the minimum time is the least disturbed one)."""
    vocab = model.config.vocab_size
    # a model with a short context gets the longest prompt that still leaves room to decode
    prompt_tokens = min(prompt_tokens, model.config.max_position_embeddings - new_tokens)
    prompt = torch.randint(3, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    generate(model, prompt[:16], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    activations = torch.bfloat16 if bf16_is_fast() and model.module.dtype == torch.float32 else None
    prefill, decode, ttft = 0.0, 0.0, float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with compute_dtype(activations):  # as the engine runs prefill (generate below runs on it)
            model.module(torch.tensor([prompt]), last_only=True)
        prefill = max(prefill, prompt_tokens / (time.perf_counter() - start))
        done = generate(model, prompt, params)
        decode = max(decode, done.decode_tokens_per_second)
        ttft = min(ttft, done.time_to_first_token)
    return Speed(prompt_tokens, prefill, new_tokens, decode, ttft)
