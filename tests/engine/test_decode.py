"""The engine's fast decode step computes exactly what the model's forward computes (the C++ step
by default, the Python loop inside `python_decode()`; tests/engine/test_fused_step.py holds the two to
each other)."""

import copy

import pytest
import torch
from helpers import CONFIGS, random_tiny

from tuili.engine.decode import decode_step
from tuili.engine.fused import python_decode
from tuili.engine.paged_cache import PagedKVCache
from tuili.kernels import ops as kernels
from tuili.quant import Int4WeightInt8Activation, Int4WeightOnly, Int8DynamicActivation, Int8WeightOnly, quantize_
from tuili.quant.linear import compute_dtype

SCHEMES = {
    "fp32": None,
    "w8a16": Int8WeightOnly(),
    "w4a16": Int4WeightOnly(group_size=32),
    "w4a8": Int4WeightInt8Activation(group_size=32),
    "w8a8": Int8DynamicActivation(),
}


def prefilled(module, config, prompts, kv_dtype=torch.float32):
    """A cache holding each prompt, bound for a decode step of one more token per sequence."""
    cache = PagedKVCache(config, num_blocks=32, block_size=4, dtype=kv_dtype)
    tables = []
    for prompt in prompts:
        table = cache.new_sequence()
        table.append(len(prompt))
        cache.bind([table])
        module(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
        tables.append(table)
    for table, prompt in zip(tables, prompts):
        table.append(len(prompt) + 1)
    cache.bind(tables, [len(p) for p in prompts], [1] * len(prompts))
    return cache


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("scheme", list(SCHEMES))
@torch.inference_mode()
def test_fast_decode_equals_the_module_forward(arch, scheme):
    model = random_tiny(arch)
    if SCHEMES[scheme] is not None:
        quantize_(model, SCHEMES[scheme], ignore=(), progress=False)
    prompts = [[5, 9, 100, 7, 3], list(range(20, 33)), [44]]
    ids, positions = torch.tensor([7, 8, 9]), torch.tensor([5, 13, 1])
    at = torch.arange(3)
    cache = prefilled(model.module, model.config, prompts)
    twin = copy.deepcopy(cache)
    fast = decode_step(model.module, cache, ids, positions, at)
    slow = model.module(ids[None], positions[None], twin, logits_at=at).logits[0]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.k, twin.k) and torch.equal(cache.v, twin.v)  # the same keys and values stored


@torch.inference_mode()
def test_hooks_or_prefill_steps_take_the_module_forward():
    model = random_tiny("llama-gqa")
    cache = prefilled(model.module, model.config, [[1, 2, 3]])
    handle = model.module.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert decode_step(model.module, cache, torch.tensor([4]), torch.tensor([3]), torch.tensor([0])) is None
    handle.remove()
    table = cache.new_sequence()
    table.append(2)
    cache.bind([table], [0], [2])  # a prefill chunk
    assert decode_step(model.module, cache, torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([1])) is None


@pytest.mark.skipif(not kernels.bf16_dot_products(), reason="the one-call path is the int16 W8 kernel's (VNNI)")
@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mha-untied-bias"])  # the second: q, k, v and MLP biases
@torch.inference_mode()
def test_w8_layers_sharing_an_input_run_in_one_kernel_call(arch, monkeypatch):
    """Under 16-bit activations a layer's q, k, v (and gate, up) are one call of the multi-layer W8
    kernel, and the step's logits equal the module forward's, which calls each layer on its own."""
    model = random_tiny(arch)
    quantize_(model, Int8WeightOnly(), ignore=(), progress=False)
    ext, calls = kernels.extension(), []
    multi = ext.w8_linear_i16_multi
    monkeypatch.setattr(ext, "w8_linear_i16_multi", lambda x, *a: calls.append(len(a[0])) or multi(x, *a))
    prompts = [[5, 9, 100, 7, 3], list(range(20, 33))]
    ids, positions, at = torch.tensor([7, 8]), torch.tensor([5, 13]), torch.arange(2)
    cache = prefilled(model.module, model.config, prompts)
    twin = copy.deepcopy(cache)
    with compute_dtype(torch.bfloat16), python_decode():
        fast = decode_step(model.module, cache, ids, positions, at)
        slow = model.module(ids[None], positions[None], twin, logits_at=at).logits[0]
    assert calls == [3, 2] * model.config.num_hidden_layers
    assert torch.equal(fast, slow) and torch.equal(cache.k, twin.k)
