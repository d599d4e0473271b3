"""The compiled decode step (tuili.engine.compiled) computes what the eager step computes, follows
the model when it changes, and steps aside where it does not apply."""

import copy

import pytest
import torch
from helpers import random_tiny
from test_decode import prefilled

from tuili.engine import LLM, SamplingParams
from tuili.engine.compiled import compile_, compiled_decode, uncompile_
from tuili.engine.decode import decode_step
from tuili.engine.fused import python_decode
from tuili.kernels import ops as kernels
from tuili.quant import Int8DynamicActivation, Int8WeightOnly, quantize_
from tuili.quant.linear import compute_dtype

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the compiled step calls tuili's C++ kernels")
PROMPTS = [[5, 9, 100, 7, 3], list(range(20, 33)), [44]]


@pytest.fixture(autouse=True)
def without_the_cpp_step():
    """Where both apply the engine takes its C++ step (faster) over a compiled graph: these tests
    set it aside so that the compiled graph is what runs."""
    with python_decode():
        yield


def both_steps(model, kv_dtype=torch.float32, prompts=PROMPTS, dtype=None):
    """Logits and caches of one decode step, compiled and eager, from the same prefilled caches."""
    n = len(prompts)
    ids, positions, at = torch.arange(7, 7 + n), torch.tensor([len(p) for p in prompts]), torch.arange(n)
    cache = prefilled(model.module, model.config, prompts, kv_dtype)
    twin = copy.deepcopy(cache)
    with torch.inference_mode(), compute_dtype(dtype):
        compile_(model)
        fast = decode_step(model.module, cache, ids, positions, at)
        uncompile_(model)
        eager = decode_step(model.module, twin, ids, positions, at)
    return fast, eager, cache, twin


@pytest.mark.parametrize(
    "arch, kv_dtype",
    [("llama-gqa", torch.float32), ("mistral-sliding", torch.bfloat16), ("llama-mha-untied-bias", torch.int8)],
)
def test_the_compiled_step_equals_the_eager_one(arch, kv_dtype):
    model = random_tiny(arch)
    fast, eager, cache, twin = both_steps(model, kv_dtype)
    torch.testing.assert_close(fast, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.k.float(), twin.k.float(), atol=1e-5, rtol=0)  # the same keys stored
    if kv_dtype == torch.int8:
        torch.testing.assert_close(cache.k_scale, twin.k_scale)


@pytest.mark.parametrize("scheme", [Int8WeightOnly(), Int8DynamicActivation()], ids=["w8a16", "w8a8"])
def test_quantized_layers_run_the_same_kernels_compiled(scheme):
    model = random_tiny("llama-gqa")
    quantize_(model, scheme, ignore=(), progress=False)
    dtype = torch.bfloat16 if kernels.bf16_dot_products() else None  # the engine's 16-bit activations
    fast, eager, *_ = both_steps(model, dtype=dtype)
    torch.testing.assert_close(fast, eager, atol=1e-3, rtol=1e-3)


def test_one_graph_serves_any_number_of_sequences_and_context_lengths():
    model = random_tiny("llama-gqa")
    llm = LLM(model, max_num_seqs=4, compile=True)  # compiled before the first request
    compiled = compiled_decode(model.module)
    seconds = compiled.compile_seconds
    assert seconds > 0
    prompts = [[1, 2, 3], list(range(10, 60)), [7] * 20, [9]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    fast = [c.token_ids for c in llm.generate(prompts, params)]
    fast_one = llm.generate(prompts[1], params)[0].token_ids
    assert compiled.compile_seconds == seconds  # 1 to 4 sequences, 1 to 5 blocks each: no new graph
    uncompile_(model)
    eager = [c.token_ids for c in LLM(model, max_num_seqs=4).generate(prompts, params)]
    assert fast == eager and fast_one == eager[1]


def test_a_changed_model_is_planned_again():
    model = random_tiny("llama-gqa")
    compile_(model)
    cache = prefilled(model.module, model.config, PROMPTS)
    ids, positions, at = torch.tensor([7, 8, 9]), torch.tensor([5, 13, 1]), torch.arange(3)
    with torch.inference_mode():
        before = decode_step(model.module, copy.deepcopy(cache), ids, positions, at)
        quantize_(model, Int8WeightOnly(), ignore=(), progress=False)  # new modules after compile_
        after = decode_step(model.module, copy.deepcopy(cache), ids, positions, at)
        uncompile_(model)
        eager = decode_step(model.module, copy.deepcopy(cache), ids, positions, at)
    torch.testing.assert_close(after, eager, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(before, after)


def test_hooks_send_the_step_back_to_the_module_forward():
    model = random_tiny("llama-gqa")
    compile_(model)
    seen = []
    handle = model.module.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    LLM(model).generate([[1, 2, 3]], params)
    handle.remove()
    assert len(seen) == 3  # the prefill and both decode steps ran the modules, hook and all


def test_compile_takes_only_tuilis_llama_models():
    with pytest.raises(ValueError, match="tuili's Llama models"):
        compile_(torch.nn.Linear(2, 2))
