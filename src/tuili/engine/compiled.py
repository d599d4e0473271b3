"""`compile_(model)`: the engine's decode step as one compiled graph (PyTorch's Inductor).

The eager decode step (tuili.engine.decode) is a Python loop that calls a kernel per linear layer,
norm, RoPE and attention: about 400 calls per token on the default model, with element-wise glue
between them. Here the same step is written against tuili's kernels as PyTorch operators
(`torch.ops.tuili.*`, registered by the C++ extension), traced once into one FX graph, and
compiled by Inductor with its C++ wrapper: the glue (residual adds, RMSNorm, RoPE, SiLU · up)
becomes fused C++ loops, and the kernels are called from C++ with no Python in between. What each
linear layer runs is resolved from the layer itself (`_KernelLinear.kernel_args`), so the
compiled step makes the same kernel calls as the eager one.

A compiled step holds the model as it was when it was planned: the plan is rebuilt (and the step
recompiled) if a module is replaced, a quantized layer's packed weights change, or a hook is added
(then the eager path runs, as it does for models or layers the plan does not cover).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuili.engine.paged_cache import PagedKVCache
from tuili.kernels import ops as kernels
from tuili.models.attention import rope_cos_sin
from tuili.models.llama import Linear, LlamaForCausalLM, hooked
from tuili.quant.linear import _KernelLinear, engine_compute_dtype

_COMPILED: weakref.WeakKeyDictionary[nn.Module, CompiledDecode] = weakref.WeakKeyDictionary()


TENSOR = "tensor"  # in a _LinearSpec's args: the next tensor of the step's weights


@dataclass(frozen=True)
class _LinearSpec:
    """One linear layer's call: a tuili operator and its arguments after x (TENSOR for each tensor,
    constants as they are), then the bias if any."""

    op: str
    args: tuple
    bias: bool


@dataclass(frozen=True)
class _Spec:
    """The step's layout: everything but the tensors, baked into the traced code as constants."""

    layers: tuple[tuple[_LinearSpec, ...], ...]  # q, k, v, o, gate, up, down per layer
    head: _LinearSpec
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    window: int  # sliding window (0: none)
    max_rows: int  # sequences per step up to which every layer's kernel applies


class CompiledDecode:
    """The decode step of one LlamaForCausalLM, compiled for each kind of step it meets (bf16 or
    fp32 activations, an int8 or float KV cache); one graph serves any number of sequences up to
    the rows every layer's kernel takes, and any context length."""

    def __init__(self, module: LlamaForCausalLM):
        self.module = module
        self._plans: dict[bool, tuple[list, _Spec, list[Tensor]]] = {}
        self._graphs: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0  # time spent compiling so far

    def __call__(self, cache: PagedKVCache, ids: Tensor, positions: Tensor, logits_at: Tensor,
                 bf16: bool) -> Tensor | None:
        """Logits as `decode_step` computes them, or None where this step must run eagerly."""
        planned = self._plan(bf16)
        if planned is None or ids.shape[0] > planned[1].max_rows:
            return None
        _, spec, tensors = planned
        step, scales = cache._step, _scales(cache)
        graph = self._graph(spec, tensors, bf16, cache.k, cache.v, scales)
        return graph(tensors, ids, positions, logits_at, cache.k, cache.v, step.slots, step.tables, step.decode_lens,
                     scales)

    def warm_up(self, cache: PagedKVCache | None = None, bf16: bool | None = None) -> bool:
        """Compile the step for a cache like `cache` (default: the one an engine makes for the model) and
        bf16 activations or not (default: as `LLMEngine` decides) now, rather than on the first
        decode step; False where the compiled step does not apply."""
        dtype = self.module.dtype
        if cache is None:
            cache = PagedKVCache(self.module.config, 4, dtype=PagedKVCache.dtype_for(self.module.config, dtype))
        if bf16 is None:
            bf16 = torch.bfloat16 in (engine_compute_dtype(dtype), dtype)
        planned = self._plan(bf16)
        if planned is None:
            return False
        _, spec, tensors = planned
        self._graph(spec, tensors, bf16, cache.k, cache.v, _scales(cache))
        return True

    def _plan(self, bf16: bool) -> tuple[list, _Spec, list[Tensor]] | None:
        planned = self._plans.get(bf16)
        if planned is None or not _still(planned[0]):
            self._plans.pop(bf16, None)
            self._graphs = {key: g for key, g in self._graphs.items() if key[0] != bf16}
            planned = _build_plan(self.module, bf16)
            if planned is None:
                return None
            self._plans[bf16] = planned
        return planned

    def _graph(self, spec: _Spec, tensors: list[Tensor], bf16: bool, k_cache: Tensor, v_cache: Tensor,
               scales: list[Tensor]) -> Callable:
        """The compiled graph for this kind of step (over caches like these), traced and compiled on first use."""
        key = (bf16, bool(scales), k_cache.dtype)
        graph = self._graphs.get(key)
        if graph is None:
            start = time.perf_counter()
            example = _example_step(k_cache, v_cache, scales)
            graph = self._graphs[key] = _compile(_step_function(spec), tensors, example)
            self.compile_seconds += time.perf_counter() - start
        return graph


def _scales(cache: PagedKVCache) -> list[Tensor]:
    """The int8 cache's scales for keys and values ([] for a float cache)."""
    return [cache.k_scale, cache.v_scale] if cache.kv_int8 else []


def _example_step(k_cache: Tensor, v_cache: Tensor, scales: list[Tensor], rows: int = 2) -> tuple:
    """Step inputs of `rows` sequences, 3 blocks each, over these caches: only their shapes matter,
    tracing runs on fake tensors. Sizes above 1, which the tracer would fix as constants."""
    ids = torch.zeros(rows, dtype=torch.long)
    tables = torch.zeros(rows, 3, dtype=torch.int32)
    return (ids, ids.clone(), torch.arange(rows), k_cache, v_cache, ids.clone(), tables,
            torch.ones(rows, dtype=torch.int32), scales)


def _compile(step: Callable, tensors: list[Tensor], example: tuple) -> Callable:
    """Trace `step` with symbolic sizes (make_fx) and compile it with Inductor's C++ wrapper.

    Not `torch.compile`: Dynamo re-checks its guards on every call, about ten per tensor, and
    with the default model's ~500 weight tensors that cost 0.7 ms of a 5 ms step (measured); so
    does Inductor's Python wrapper, which calls ~400 kernels a step. Traced here once, the graph
    is only ever called with inputs of the layout it was traced for (the caller checks), and its
    C++ wrapper calls the kernels without Python in between."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental import _config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    with fx_config.patch(use_duck_shape=False):  # equal example sizes must not become one symbol
        graph = make_fx(step, tracing_mode="symbolic")(tensors, *example)
    # the graph's inputs (FX names them "placeholder" nodes) carry fake tensors with symbolic sizes:
    # they tell Inductor which sizes may vary
    symbolic_inputs = [node.meta["val"] for node in graph.graph.nodes if node.op == "placeholder"]
    with inductor_config.patch(cpp_wrapper=True):
        return compile_fx(graph, symbolic_inputs)


def _step_function(spec: _Spec) -> Callable:
    """The decode step for one layout; `w` holds the weights in the order `_build_plan` lists them."""
    heads, kv_heads, dim, eps, window = spec.heads, spec.kv_heads, spec.head_dim, spec.eps, spec.window

    def linear(s: _LinearSpec, w: list[Tensor], at: int, x: Tensor) -> tuple[Tensor, int]:
        args = []
        for a in s.args:
            if a == TENSOR:
                a, at = w[at], at + 1
            args.append(a)
        y = getattr(torch.ops.tuili, s.op)(x, *args)
        if s.bias:
            y, at = y + w[at], at + 1
        return y.to(x.dtype), at

    def step(w: list[Tensor], ids: Tensor, positions: Tensor, logits_at: Tensor, k_cache: Tensor, v_cache: Tensor,
             slots: Tensor, tables: Tensor, lens: Tensor, scales: list[Tensor]) -> Tensor:
        k_scale, v_scale = scales if scales else (None, None)  # int8 caches: one scale per token and head
        ops = torch.ops.tuili
        embed, inv_freq, final_norm, sm_scale = w[0], w[1], w[2], dim ** -0.5
        n = ids.shape[0]
        x = F.embedding(ids, embed)
        cos, sin = rope_cos_sin(inv_freq, positions[None], x.dtype)
        at = 3
        for i, (q_s, k_s, v_s, o_s, gate_s, up_s, down_s) in enumerate(spec.layers):
            norm1, norm2, at = w[at], w[at + 1], at + 2
            h = kernels.rms_norm_reference(x, norm1, eps)
            q, at = linear(q_s, w, at, h)
            k, at = linear(k_s, w, at, h)
            v, at = linear(v_s, w, at, h)
            q = kernels.rope_reference(q.view(1, n, heads, dim), cos, sin)[0]
            k = kernels.rope_reference(k.view(1, n, kv_heads, dim), cos, sin)[0]
            ops.paged_write(k_cache, v_cache, i, slots, k, v.view(n, kv_heads, dim), k_scale, v_scale)
            ks = None if k_scale is None else k_scale[i]
            vs = None if v_scale is None else v_scale[i]
            out = ops.paged_attention(q, k_cache[i], v_cache[i], tables, lens, sm_scale, ks, vs, window)
            o, at = linear(o_s, w, at, out.reshape(n, heads * dim))
            x = x + o
            h = kernels.rms_norm_reference(x, norm2, eps)
            gate, at = linear(gate_s, w, at, h)
            up, at = linear(up_s, w, at, h)
            down, at = linear(down_s, w, at, F.silu(gate) * up)
            x = x + down
        logits, _ = linear(spec.head, w, at, kernels.rms_norm_reference(x, final_norm, eps)[logits_at])
        return logits

    return step


def _linear_plan(module: nn.Module, bf16: bool) -> tuple[_LinearSpec, list[Tensor], int] | None:
    """A layer's call, its tensors and the rows up to which it applies; None for a layer the
    compiled step cannot make (then the eager path runs)."""
    if isinstance(module, _KernelLinear):
        args = module.bf16_kernel_args() if bf16 else module.kernel_args()
        if not args:
            return None
        name, rest, bias = args[0], args[1:-1], args[-1]
        tensors = [a for a in rest if isinstance(a, Tensor)] + ([bias] if bias is not None else [])
        layout = tuple(TENSOR if isinstance(a, Tensor) else a for a in rest)
        return _LinearSpec(name, layout, bias is not None), tensors, kernels.MAX_ROWS[name]
    # float layers: tuili's fp32 GEMV, which is what the eager step runs up to MAX_M_F32 rows (above
    # that, F.linear inside the graph measured 5× slower than eager oneDNN: those steps run eagerly)
    if (type(module) in (Linear, nn.Linear) and module.weight.dtype == torch.float32
            and module.weight.is_contiguous() and kernels.f32_gemv()):
        spec = _LinearSpec("f32_linear", (TENSOR, None), module.bias is not None)
        return spec, [module.weight] + ([module.bias] if module.bias is not None else []), kernels.MAX_M_F32
    return None


def _build_plan(module: LlamaForCausalLM, bf16: bool) -> tuple[list, _Spec, list[Tensor]] | None:
    """The layout, the flat weights, and what must still hold for them to apply: (parent's
    modules, name, module, (key, cached kernel args) or None) for every module the step reads."""
    if kernels.extension() is None or not kernels.register_fakes() or hooked(()):
        return None
    backbone = module._modules["model"]
    parts = backbone._modules
    embed, final_norm, layer_list = parts["embed_tokens"], parts["norm"], parts["layers"]
    if type(embed) is not nn.Embedding:
        return None
    checks = [({"": module}, "", module, None), (module._modules, "model", backbone, None),
              (parts, "embed_tokens", embed, None), (parts, "norm", final_norm, None)]
    checks += [(layer_list._modules, name, layer, None) for name, layer in layer_list._modules.items()]
    checks.append((layer_list._modules, str(len(layer_list)), None, None))  # no layer appended
    tensors: list[Tensor] = [embed.weight, module.inv_freq, final_norm.weight]
    max_rows = 1 << 30

    def linear(parent: nn.Module, name: str) -> _LinearSpec | None:
        nonlocal max_rows
        child = parent._modules[name]
        made = _linear_plan(child, bf16)
        if made is None:
            return None
        checks.append((parent._modules, name, child, _args_key(child, bf16)))
        tensors.extend(made[1])
        max_rows = min(max_rows, made[2])
        return made[0]

    layers = []
    for layer in layer_list:
        sub = layer._modules
        attn, mlp = sub["self_attn"], sub["mlp"]
        checks.extend((sub, name, child, None) for name, child in sub.items())
        tensors += [sub["input_layernorm"].weight, sub["post_attention_layernorm"].weight]
        specs = tuple([linear(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
                      + [linear(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")])
        if None in specs:
            return None
        layers.append(specs)
    head = linear(module, "lm_head")
    if head is None:
        return None
    attn = layer_list[0]._modules["self_attn"]
    spec = _Spec(tuple(layers), head, attn.num_heads, attn.num_kv_heads, attn.head_dim, final_norm.eps,
                 module.config.sliding_window or 0, max_rows)
    if not _still(checks):  # a hook watches one of the modules: the eager path calls them
        return None
    return checks, spec, tensors


def _args_key(module: nn.Module, bf16: bool) -> tuple[str, object] | None:
    """Where a quantized layer caches its kernel's arguments (dropped when its buffers change)."""
    if not isinstance(module, _KernelLinear):
        return None
    key = "_bf16_kernel_args" if bf16 else "_kernel_args"
    return key, module.__dict__.get(key)


def _still(checks: list) -> bool:
    """The plan's modules are still in place, unhooked, and their kernels' arguments unchanged."""
    if hooked(()):
        return False
    for modules, name, child, args in checks:
        if modules.get(name) is not child:
            return False
        if child is not None and (child._forward_hooks or child._forward_pre_hooks):
            return False
        if args is not None and child.__dict__.get(args[0]) is not args[1]:
            return False
    return True


def compile_(model) -> CompiledDecode:
    """Make every engine over `model` (a Model or its module) run its decode steps as one compiled
    graph; each kind of step compiles on its first call (`CompiledDecode.warm_up` does it before).
    Returns the compiled step."""
    module = getattr(model, "module", model)
    if type(module) is not LlamaForCausalLM:
        raise ValueError(f"compile_ takes tuili's Llama models (tuili.load); got {type(module).__name__}")
    compiled = _COMPILED.get(module)
    if compiled is None:
        compiled = _COMPILED[module] = CompiledDecode(module)
    return compiled


def uncompile_(model) -> None:
    """Back to the eager decode step."""
    _COMPILED.pop(getattr(model, "module", model), None)


def compiled_decode(module: nn.Module) -> CompiledDecode | None:
    """The compiled step `compile_` made for this module, if any."""
    return _COMPILED.get(module)
