"""The engine's C++ decode step (tuili.engine.step) makes the module forward's kernel calls, so its
logits and caches are the module forward's bit for bit, for every family and scheme; it follows the
model when the engine is told to look again, and steps aside where it does not apply."""

import copy
import gc
import weakref

import pytest
import torch
from helpers import CONFIGS, random_tiny
from torch import nn

import tuili.engine.step as step_module
from tuili.engine import LLM, SamplingParams
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.step import DecodeStep
from tuili.kernels import ops as kernels
from tuili.kernels import repack
from tuili.kernels.contract import OPS
from tuili.prune.structured import prune_experts_
from tuili.quant import Int4WeightInt8Activation, Int4WeightOnly, Int8DynamicActivation, Int8WeightOnly, quantize_
from tuili.quant.kernel_layer import compute_dtype

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the C++ step is one of tuili's kernels")
SCHEMES = {
    "fp32": None,
    "w8a16": Int8WeightOnly(),
    "w4a16": Int4WeightOnly(group_size=32),
    "w4a8": Int4WeightInt8Activation(group_size=32),
    "w8a8": Int8DynamicActivation(),
}
PROMPTS = [[5, 9, 100, 7, 3], list(range(20, 33)), [44]]
STEP = torch.tensor([7, 8, 9]), torch.tensor([5, 13, 1]), torch.arange(3)  # ids, positions, logits_at


def prefilled(module, config, prompts, kv_dtype=torch.float32):
    """A cache holding each prompt, bound for a decode step of one more token per sequence."""
    blocks = sum(len(p) // 4 + 1 for p in prompts) + 4  # and room for a prefill beside them
    cache = PagedKVCache(config, num_blocks=blocks, block_size=4, dtype=kv_dtype)
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


def both_ways(model, kv_dtype=torch.float32, activations=None, prompts=PROMPTS, step=STEP, decode=None):
    """One decode step through the C++ step and through the module forward, from the same prefilled
    cache: (logits, cache) each; the first logits are None where the C++ step does not apply."""
    decode = decode or DecodeStep(model.module)
    with torch.inference_mode():
        cache = prefilled(model.module, model.config, prompts, kv_dtype)
        twin = copy.deepcopy(cache)
        with compute_dtype(activations):
            fast = decode(cache, *step, activations)
            ids, positions, at = step
            slow = model.module(ids[None], positions[None], twin, logits_at=at).logits[0]
    return (fast, cache), (slow, twin)


def assert_same(fast, slow):
    (a, cache), (b, twin) = fast, slow
    assert a is not None and torch.equal(a, b)
    for x, y in ((cache.k, twin.k), (cache.v, twin.v), (cache.k_scale, twin.k_scale)):
        assert x is None and y is None or torch.equal(x, y)  # the same keys and values stored


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("activations", [None, torch.bfloat16], ids=["fp32-activations", "bf16-activations"])
def test_the_cpp_step_is_the_module_forward_bit_for_bit(arch, scheme, activations):
    model = random_tiny(arch)
    if SCHEMES[scheme] is not None:
        quantize_(model, SCHEMES[scheme], ignore=(), progress=False)
    assert_same(*both_ways(model, activations=activations))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_kv_cache_format(arch, kv_dtype):
    model = random_tiny(arch)
    quantize_(model, Int8WeightOnly(), ignore=(), progress=False)
    assert_same(*both_ways(model, kv_dtype, torch.bfloat16))


@pytest.mark.parametrize("scheme", ["fp32", "w8a16", "w4a16"])
def test_bf16_models_take_the_cpp_step_too(scheme):
    model = random_tiny("llama-mha-untied-bias")
    model.module.to(torch.bfloat16)
    if SCHEMES[scheme] is not None:
        quantize_(model, SCHEMES[scheme], ignore=(), progress=False)
    assert_same(*both_ways(model, torch.bfloat16))


def test_more_sequences_than_the_fp32_gemv_takes_run_through_pytorchs_linear():
    model = random_tiny("llama-gqa")  # float layers: tuili's GEMV up to f32_gemv_rows(), PyTorch's above
    n = kernels.f32_gemv_rows() + 1
    prompts = [[3 + i, 4 + i] for i in range(n)]
    step = torch.arange(10, 10 + n), torch.full((n,), 2), torch.arange(n)
    assert_same(*both_ways(model, prompts=prompts, step=step))


def test_more_sequences_than_a_quantized_kernel_takes_run_the_module_forward():
    model = random_tiny("llama-gqa")
    quantize_(model, Int8WeightOnly(), ignore=(), progress=False)  # fp32 W8: its kernel takes up to 64 rows
    n = model.module.lm_head.kernel_call().max_rows + 1
    assert n < 1000
    prompts = [[3 + i % 50, 4] for i in range(n)]
    step = torch.arange(10, 10 + n) % 50, torch.full((n,), 2), torch.arange(n)
    assert both_ways(model, prompts=prompts, step=step)[0][0] is None


@pytest.mark.skipif(not repack.bf16_dot_products(), reason="the one-call path is the int16 W8 kernel's (VNNI)")
@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mha-untied-bias"])  # the second: q, k, v and MLP biases
def test_w8_layers_sharing_an_input_run_in_one_kernel_call(arch, monkeypatch):
    """Under 16-bit activations a layer's q, k, v (and gate, up) are one call of the multi-layer W8
    kernel, and the logits equal the module forward's, which calls each layer on its own."""
    model = random_tiny(arch)
    quantize_(model, Int8WeightOnly(), ignore=(), progress=False)
    ext, calls = kernels.extension(), []
    multi = ext.w8_linear_i16_multi
    monkeypatch.setattr(ext, "w8_linear_i16_multi", lambda x, *a: calls.append(len(a[0])) or multi(x, *a))
    fast, slow = both_ways(model, activations=torch.bfloat16)
    assert calls == []  # the C++ step calls the kernel inside C++, not through the Python binding
    assert_same(fast, slow)


def test_mixed_formats_and_float_layers_in_one_step():
    model = random_tiny("llama-gqa")
    quantize_(model, Int8WeightOnly(), targets=["*.self_attn.*"], progress=False)
    quantize_(model, Int4WeightOnly(group_size=32), targets=["*.mlp.down_proj"], progress=False)
    assert_same(*both_ways(model, activations=torch.bfloat16))


def test_a_replaced_module_or_weight_is_planned_again():
    model = random_tiny("llama-gqa")
    decode = DecodeStep(model.module)
    both_ways(model, decode=decode)
    quantize_(model, Int8WeightOnly(), targets=["*.mlp.*"], progress=False)  # new modules
    assert_same(*both_ways(model, decode=decode))
    proj = model.module.model.layers[1].self_attn.o_proj  # a new weight tensor, as pruning assigns one
    proj.weight = nn.Parameter(torch.randn_like(proj.weight))
    assert_same(*both_ways(model, decode=decode))
    layer = model.module.model.layers[0].mlp.up_proj  # new packed weights inside the same module
    layer.scale = layer.scale * 2
    assert_same(*both_ways(model, decode=decode))


def test_without_a_check_the_plan_is_reused(monkeypatch):
    """The engine asks for a check once per new request: steps in between reuse the plan as it is."""
    model = random_tiny("llama-gqa")
    decode = DecodeStep(model.module)
    both_ways(model, decode=decode)
    built = []
    monkeypatch.setattr(step_module, "build_plan", lambda *a: built.append(1))
    with torch.inference_mode():
        cache = prefilled(model.module, model.config, PROMPTS)
        assert decode(copy.deepcopy(cache), *STEP, None, check=False) is not None
        assert decode(copy.deepcopy(cache), *STEP, None, check=True) is not None
    assert built == []  # nothing changed: the check passed, nothing was rebuilt


def test_the_engine_picks_up_a_changed_model_at_the_next_request():
    model = random_tiny("llama-gqa")
    llm = LLM(model, max_num_seqs=4)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3], list(range(10, 40))]
    before = [c.token_ids for c in llm.generate(prompts, params)]
    quantize_(model, Int4WeightOnly(group_size=32), ignore=(), progress=False)
    after = [c.token_ids for c in llm.generate(prompts, params)]
    module_forward = [c.token_ids for c in LLM(model, max_num_seqs=4, fast_decode=False).generate(prompts, params)]
    assert after == module_forward and after != before


def test_hooks_prefill_steps_and_unknown_layers_take_the_module_forward(monkeypatch):
    model = random_tiny("llama-gqa")
    decode = DecodeStep(model.module)
    seen = []
    handle = model.module.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(1))
    assert both_ways(model, decode=decode)[0][0] is None
    handle.remove()
    assert both_ways(model, decode=decode)[0][0] is not None
    with torch.inference_mode():
        cache = prefilled(model.module, model.config, [[1, 2, 3]])
        table = cache.new_sequence()
        table.append(2)
        cache.bind([table], [0], [2])  # a prefill chunk
        assert decode(cache, torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([1]), None) is None

    class Doubled(nn.Module):  # a layer no kernel takes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    mlp = model.module.model.layers[1].mlp
    mlp.up_proj = Doubled(mlp.up_proj)
    built = []
    real = step_module.build_plan
    monkeypatch.setattr(step_module, "build_plan", lambda *a: built.append(1) or real(*a))
    for _ in range(3):
        assert both_ways(model, decode=decode)[0][0] is None
    assert built == [1]  # the layout is looked at once; the checks then say nothing changed
    assert DecodeStep(nn.Linear(2, 2)).applies(None) is False


def test_a_decode_plan_refuses_what_it_cannot_call():
    plan = kernels.extension().DecodePlan
    w, norm = torch.zeros(16, 16), torch.ones(16)

    def rest(layers=1, activation="silu", qk_norms=(), scale=8**-0.5, softcap=0.0, windows=None, experts=0, top_k=0):
        windows = [0] * layers if windows is None else windows
        n = (4 + (1 + 3 * experts if experts else 3)) * layers + 1
        small = ([""] * n, [[]] * n, [[]] * n, [0] * n)
        moe = ([experts] * layers, top_k, False)
        return (
            2,
            1,
            8,
            1e-5,
            windows,
            activation,
            list(qk_norms),
            scale,
            softcap,
            [False] * layers,
            False,
            *small,
            *moe,
        )

    with pytest.raises(RuntimeError, match="no kernel named w3_linear"):
        plan(["w3_linear"], [[w, None]], [[]], [None], [norm], *rest(0))
    with pytest.raises(RuntimeError, match="q, k, v, o and gate, up, down .or a router and each expert's three."):
        plan(["linear"] * 2, [[w, None]] * 2, [[8]] * 2, [None] * 2, [norm], *rest())
    with pytest.raises(RuntimeError, match="a mixture needs at least top_k > 0 experts"):
        plan(["linear"] * 9, [[w, None]] * 9, [[8]] * 9, [None] * 9, [norm] * 3, *rest(experts=1, top_k=2))
    linears = (["linear"] * 8, [[w, None]] * 8, [[8]] * 8, [None] * 8)
    with pytest.raises(RuntimeError, match="two norms per layer .four with output norms. and a final one"):
        plan(*linears, [norm], *rest())
    with pytest.raises(RuntimeError, match="one window and one RoPE choice per layer"):
        plan(*linears, [norm] * 3, *rest(windows=[]))
    with pytest.raises(RuntimeError, match="the attention scale must be positive, the soft cap >= 0"):
        plan(*linears, [norm] * 3, *rest(softcap=-1.0))
    with pytest.raises(RuntimeError, match="no q/k norms, or two per layer"):
        plan(*linears, [norm] * 3, *rest(qk_norms=[norm]))
    with pytest.raises(RuntimeError, match="no activation named gelu_new"):
        plan(*linears, [norm] * 3, *rest(activation="gelu_new"))


def test_the_cpp_step_knows_every_kernel_of_the_contract():
    assert sorted(kernels.extension().decode_kernels()) == sorted(OPS)


def test_an_engine_and_its_model_can_still_be_freed():
    model = random_tiny("llama-gqa")
    llm = LLM(model)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    ref = weakref.ref(model.module)
    del model, llm
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


@pytest.mark.parametrize("arch", ["qwen3-moe", "mixtral"])
def test_a_mixture_routes_in_the_cpp_step_as_in_the_module(arch):
    """Eight sequences (every expert chosen by some), then half the experts pruned (a smaller
    router): the router's choice, each expert's rows and the weighted sums are the module's."""
    prompts = [[3 + i, 40 + 7 * i, 90 + i] for i in range(8)]
    step = torch.arange(50, 58), torch.full((8,), 3), torch.arange(8)
    model = random_tiny(arch)
    assert_same(*both_ways(model, prompts=prompts, step=step))
    prune_experts_(model, 0.5, "l2")
    counts = {len(layer.mlp.experts) for layer in model.module.model.layers if hasattr(layer.mlp, "experts")}
    assert counts == {2}
    quantize_(model, SCHEMES["w8a16"], progress=False)  # experts quantized, the router left in float
    assert_same(*both_ways(model, activations=torch.bfloat16, prompts=prompts, step=step))


@pytest.mark.parametrize("rows", [0, 2, 64])
@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_small_batches_may_take_the_gemv_and_stay_bit_for_bit(monkeypatch, rows, scheme):
    # where this CPU runs the fp32-activation GEMV faster at small batches (repack.small_batch_rows),
    # a bf16 layer's call carries it for those; the C++ step and the module forward choose alike
    monkeypatch.setattr(repack, "small_batch_rows", lambda bits: rows)
    model = random_tiny("llama-gqa")
    quantize_(model, SCHEMES[scheme], ignore=(), progress=False)
    call = model.module.model.layers[0].mlp.up_proj.kernel_call(True)
    assert (call.small is not None) == (rows > 0 and repack.bf16_dot_products())
    for prompts, step in ((PROMPTS, STEP), (PROMPTS[:1], tuple(t[:1] for t in STEP))):  # 3 rows, then 1
        assert_same(*both_ways(model, activations=torch.bfloat16, prompts=prompts, step=step))
    if call.small is not None:
        x = torch.randn(rows, 64)  # up_proj reads the hidden size
        ext = kernels.extension()
        assert torch.equal(call.run(ext, x), call.small.run(ext, x))
        wide = torch.randn(rows + 1, 64)  # past small_rows: the bf16 kernel
        assert torch.equal(call.run(ext, wide), getattr(ext, call.name)(wide, *call.args))
