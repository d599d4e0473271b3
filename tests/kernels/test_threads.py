"""The kernels split output rows over torch's threads: two threads give the one-thread tokens and
log-probabilities. (`make test` runs two workers of one thread each, so only this file splits.)"""

import pytest
import torch
from helpers import random_tiny

import tuili
from tests.kernels.test_ops import needs_kernels
from tuili.quant import (
    Int4WeightInt8Activation,
    Int4WeightOnly,
    Int8DynamicActivation,
    Int8WeightOnly,
    quantize_,
)

SCHEMES = {
    "fp32": None,
    "w8a16": Int8WeightOnly(),
    "w4a16-g32": Int4WeightOnly(group_size=32),
    "w4a8-g32": Int4WeightInt8Activation(group_size=32),
    "w8a8-dynamic": Int8DynamicActivation(),
}


def generate(model, threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prompts = [list(range(3, 3 + n)) for n in (70, 5, 17)]  # a prefill past 64 rows, then a decode batch
        params = tuili.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
        done = tuili.LLM(model).generate(prompts, params, use_tqdm=False)
    finally:
        torch.set_num_threads(before)
    tokens = [c.outputs[0].token_ids for c in done]
    logprobs = torch.tensor([[lp.logprob for step in c.outputs[0].logprobs for lp in step.values()] for c in done])
    return tokens, logprobs


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
def test_two_threads_give_the_one_thread_tokens_and_logprobs(scheme):
    model = random_tiny("llama-gqa")
    if SCHEMES[scheme] is not None:
        quantize_(model, SCHEMES[scheme], progress=False)
    tokens, logprobs = generate(model, 1)
    tokens2, logprobs2 = generate(model, 2)
    assert tokens2 == tokens
    torch.testing.assert_close(logprobs2, logprobs, rtol=0, atol=1e-4)
