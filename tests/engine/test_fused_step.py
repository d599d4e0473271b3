"""The C++ decode step (tuili.engine.fused) makes the Python step's kernel calls, so its logits and
caches are the Python step's bit for bit; it follows the model when the engine is told to look
again, and steps aside where it does not apply."""

import copy
import gc
import weakref

import pytest
import torch
from helpers import random_tiny
from test_decode import SCHEMES, prefilled
from torch import nn

import tuili.engine.fused as fused_module
from tuili.engine import LLM, SamplingParams
from tuili.engine.decode import decode_step
from tuili.engine.fused import fused_decode, python_decode
from tuili.kernels import ops as kernels
from tuili.quant import Int4WeightOnly, Int8WeightOnly, quantize_
from tuili.quant.linear import compute_dtype

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the C++ step is one of tuili's kernels")
PROMPTS = [[5, 9, 100, 7, 3], list(range(20, 33)), [44]]
STEP = torch.tensor([7, 8, 9]), torch.tensor([5, 13, 1]), torch.arange(3)  # ids, positions, logits_at


def fused_and_python(model, kv_dtype=torch.float32, activations=None, prompts=PROMPTS, step=STEP):
    """One decode step both ways from the same prefilled cache: (logits, cache) each."""
    cache = prefilled(model.module, model.config, prompts, kv_dtype)
    twin = copy.deepcopy(cache)
    with torch.inference_mode(), compute_dtype(activations):
        fast = fused_decode(model.module)(cache, *step, activations == torch.bfloat16)
        with python_decode():
            slow = decode_step(model.module, twin, *step)
    return (fast, cache), (slow, twin)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize(
    "arch, kv_dtype",
    [
        ("llama-gqa", torch.float32),
        ("llama-mha-untied-bias", torch.bfloat16),
        ("mistral-sliding", torch.int8),
        ("llama-mqa-tied", torch.float32),
    ],
)
@pytest.mark.parametrize("activations", [None, torch.bfloat16], ids=["fp32-activations", "bf16-activations"])
def test_the_cpp_step_is_the_python_step_bit_for_bit(scheme, arch, kv_dtype, activations):
    model = random_tiny(arch)
    if SCHEMES[scheme] is not None:
        quantize_(model, SCHEMES[scheme], ignore=(), progress=False)
    (fast, cache), (slow, twin) = fused_and_python(model, kv_dtype, activations)
    assert fast is not None and torch.equal(fast, slow)
    for a, b in ((cache.k, twin.k), (cache.v, twin.v), (cache.k_scale, twin.k_scale)):
        assert a is None and b is None or torch.equal(a, b)  # the same keys and values stored


def test_mixed_formats_and_float_layers_in_one_step():
    model = random_tiny("llama-gqa")
    quantize_(model, Int8WeightOnly(), targets=["*.self_attn.*"], progress=False)
    quantize_(model, Int4WeightOnly(group_size=32), targets=["*.mlp.down_proj"], progress=False)
    (fast, _), (slow, _) = fused_and_python(model, activations=torch.bfloat16)
    assert torch.equal(fast, slow)


def test_more_sequences_than_every_kernel_takes_run_in_python():
    model = random_tiny("llama-gqa")  # float layers: tuili's fp32 GEMV up to MAX_M_F32 rows
    n = kernels.MAX_M_F32 + 1
    prompts = [[3 + i, 4 + i] for i in range(n)]
    step = torch.arange(10, 10 + n), torch.full((n,), 2), torch.arange(n)
    cache = prefilled(model.module, model.config, prompts)
    with torch.inference_mode():
        assert fused_decode(model.module)(cache, *step, False) is None
        assert decode_step(model.module, cache, *step) is not None  # the Python loop takes it


def test_a_replaced_module_or_weight_is_planned_again():
    model = random_tiny("llama-gqa")
    fused_and_python(model)
    quantize_(model, Int8WeightOnly(), targets=["*.mlp.*"], progress=False)  # new modules
    (fast, _), (slow, _) = fused_and_python(model)
    assert torch.equal(fast, slow)
    proj = model.module.model.layers[1].self_attn.o_proj  # a new weight tensor, as pruning assigns one
    proj.weight = nn.Parameter(torch.randn_like(proj.weight))
    (fast, _), (slow, _) = fused_and_python(model)
    assert torch.equal(fast, slow)


def test_without_a_check_the_plan_is_reused(monkeypatch):
    """The engine asks for a check once per new request: steps in between reuse the plan as it is."""
    model = random_tiny("llama-gqa")
    fused_and_python(model)
    built = []
    monkeypatch.setattr(fused_module, "build_plan", lambda *a: built.append(1))
    cache = prefilled(model.module, model.config, PROMPTS)
    with torch.inference_mode():
        assert fused_decode(model.module)(cache, *STEP, False, check=False) is not None
        assert fused_decode(model.module)(copy.deepcopy(cache), *STEP, False, check=True) is not None
    assert built == []  # nothing changed: the check passed, nothing was rebuilt


def test_the_engine_picks_up_a_changed_model_at_the_next_request():
    model = random_tiny("llama-gqa")
    llm = LLM(model, max_num_seqs=4)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3], list(range(10, 40))]
    before = [c.token_ids for c in llm.generate(prompts, params)]
    quantize_(model, Int4WeightOnly(group_size=32), ignore=(), progress=False)
    after = [c.token_ids for c in llm.generate(prompts, params)]
    with python_decode():
        python = [c.token_ids for c in LLM(model, max_num_seqs=4).generate(prompts, params)]
    assert after == python and after != before


def test_hooks_and_unsupported_layers_take_the_python_path(monkeypatch):
    model = random_tiny("llama-gqa")
    cache = prefilled(model.module, model.config, PROMPTS)
    seen = []
    handle = model.module.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(1))
    with torch.inference_mode():
        assert fused_decode(model.module)(copy.deepcopy(cache), *STEP, False) is None
        assert decode_step(model.module, copy.deepcopy(cache), *STEP) is None  # the module forward runs
        handle.remove()
        assert fused_decode(model.module)(copy.deepcopy(cache), *STEP, False) is not None

        class Doubled(nn.Module):  # a layer no kernel takes
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return 2 * self.inner(x)

        mlp = model.module.model.layers[1].mlp
        mlp.up_proj = Doubled(mlp.up_proj)
        built = []
        real = fused_module.build_plan
        monkeypatch.setattr(fused_module, "build_plan", lambda *a: built.append(1) or real(*a))
        for _ in range(3):
            assert fused_decode(model.module)(copy.deepcopy(cache), *STEP, False) is None
        assert built == [1]  # the layout is looked at once; the checks then say nothing changed
        with python_decode():
            slow = decode_step(model.module, copy.deepcopy(cache), *STEP)
        assert torch.equal(decode_step(model.module, copy.deepcopy(cache), *STEP), slow)


def test_bf16_models_and_other_modules_have_no_cpp_step():
    model = random_tiny("llama-gqa")
    model.module.to(torch.bfloat16)
    cache = prefilled(model.module, model.config, PROMPTS, torch.bfloat16)
    with torch.inference_mode():
        assert fused_decode(model.module)(cache, *STEP, True) is None
    assert fused_decode(nn.Linear(2, 2)) is None
    with python_decode():
        assert fused_decode(random_tiny("llama-gqa").module) is None


def test_a_decode_plan_refuses_what_it_cannot_call():
    plan = kernels.extension().DecodePlan
    w, norm = torch.zeros(16, 16), torch.ones(16)
    with pytest.raises(RuntimeError, match="no kernel named w3_linear"):
        plan(["w3_linear"], [[w, None]], [[]], [None], [norm], 2, 1, 8, 1e-5, 0)
    with pytest.raises(RuntimeError, match="f32_linear takes 2 tensors and 0 integers"):
        plan(["f32_linear"], [[w]], [[]], [None], [norm], 2, 1, 8, 1e-5, 0)
    with pytest.raises(RuntimeError, match="7 linear layers per decoder layer and a head"):
        plan(["f32_linear"] * 2, [[w, None]] * 2, [[]] * 2, [None] * 2, [norm], 2, 1, 8, 1e-5, 0)
    with pytest.raises(RuntimeError, match="two norms per layer and a final one"):
        plan(["f32_linear"] * 8, [[w, None]] * 8, [[]] * 8, [None] * 8, [norm], 2, 1, 8, 1e-5, 0)


def test_a_planned_model_can_still_be_freed():
    """The plans are kept per model but hold it weakly: an engine's model (513 MiB for the default
    one) is freed when the user drops it."""
    model = random_tiny("llama-gqa")
    fused_and_python(model)
    ref = weakref.ref(model.module)
    del model
    gc.collect()
    assert ref() is None


def test_an_idle_engine_lets_go_of_the_weights_it_planned_with():
    """A model quantized in place after a generate frees its float weights at once: the engine drops
    the C++ step's plan (which holds them) when its last request finishes."""
    model = random_tiny("llama-gqa")
    llm = LLM(model)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([[1, 2, 3]], params)
    old = weakref.ref(model.module.model.layers[0].mlp.up_proj.weight)
    quantize_(model, Int8WeightOnly(), ignore=(), progress=False)
    gc.collect()
    assert old() is None
    assert llm.generate([[1, 2, 3]], params)[0].token_ids  # and the next request plans again
