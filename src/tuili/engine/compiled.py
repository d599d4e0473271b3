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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.plan import (
    TENSOR,
    Checks,
    LinearSpec,
    ModelStep,
    StepSpec,
    bf16_step,
    build_plan,
)
from tuili.kernels import ops as kernels
from tuili.models.attention import rope_cos_sin
from tuili.models.llama import LlamaForCausalLM
from tuili.quant.linear import engine_compute_dtype

_COMPILED: weakref.WeakKeyDictionary[nn.Module, CompiledDecode] = weakref.WeakKeyDictionary()


class CompiledDecode(ModelStep):
    """The decode step of one LlamaForCausalLM, compiled for each kind of step it meets (bf16 or
    fp32 activations, an int8 or float KV cache); one graph serves any number of sequences up to
    the rows every layer's kernel takes, and any context length."""

    def __init__(self, module: LlamaForCausalLM):
        super().__init__(module)
        self._plans: dict[bool, tuple[Checks, StepSpec, list[Tensor]]] = {}
        self._graphs: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0  # time spent compiling so far

    def __call__(
        self, cache: PagedKVCache, ids: Tensor, positions: Tensor, logits_at: Tensor, bf16: bool, check: bool = True
    ) -> Tensor | None:
        """Logits as `decode_step` computes them, or None where this step must run eagerly."""
        planned = self._plan(bf16, check)
        if planned is None or ids.shape[0] > planned[1].max_rows:
            return None
        _, spec, tensors = planned
        step, scales = cache._step, _scales(cache)
        graph = self._graph(spec, tensors, bf16, cache.k, cache.v, scales)
        return graph(
            tensors, ids, positions, logits_at, cache.k, cache.v, step.slots, step.tables, step.decode_lens, scales
        )

    def warm_up(self, cache: PagedKVCache | None = None, bf16: bool | None = None) -> bool:
        """Compile the step for a cache like `cache` (default: the one an engine makes for the model) and
        bf16 activations or not (default: as `LLMEngine` decides) now, rather than on the first
        decode step; False where the compiled step does not apply."""
        dtype = self.module.dtype
        if cache is None:
            cache = PagedKVCache(self.module.config, 4, dtype=PagedKVCache.dtype_for(self.module.config, dtype))
        if bf16 is None:
            bf16 = bf16_step(dtype, engine_compute_dtype(dtype))
        planned = self._plan(bf16)
        if planned is None:
            return False
        _, spec, tensors = planned
        self._graph(spec, tensors, bf16, cache.k, cache.v, _scales(cache))
        return True

    def _plan(self, bf16: bool, check: bool = True) -> tuple[Checks, StepSpec, list[Tensor]] | None:
        """This kind of step's plan, rebuilt where the model changed; None where it cannot run."""
        planned = self._plans.get(bf16)
        if planned is None or (check and not planned[0].still()):
            self._plans.pop(bf16, None)
            self._graphs = {key: g for key, g in self._graphs.items() if key[0] != bf16}
            planned = build_plan(self.module, bf16) if kernels.register_fakes() else None
            if planned is None:
                return None
            self._plans[bf16] = planned
        return planned if planned[1] is not None else None

    def _graph(
        self, spec: StepSpec, tensors: list[Tensor], bf16: bool, k_cache: Tensor, v_cache: Tensor, scales: list[Tensor]
    ) -> Callable:
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
    return (
        ids,
        ids.clone(),
        torch.arange(rows),
        k_cache,
        v_cache,
        ids.clone(),
        tables,
        torch.ones(rows, dtype=torch.int32),
        scales,
    )


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


def _step_function(spec: StepSpec) -> Callable:
    """The decode step for one layout; `w` holds the weights in the order `build_plan` lists them."""
    heads, kv_heads, dim, eps, window = spec.heads, spec.kv_heads, spec.head_dim, spec.eps, spec.window

    def linear(s: LinearSpec, w: list[Tensor], at: int, x: Tensor) -> tuple[Tensor, int]:
        args = []
        for a in s.args:
            if a == TENSOR:
                a, at = w[at], at + 1
            args.append(a)
        y = getattr(torch.ops.tuili, s.op)(x, *args)
        if s.bias:
            y, at = y + w[at], at + 1
        return y.to(x.dtype), at

    def step(
        w: list[Tensor],
        ids: Tensor,
        positions: Tensor,
        logits_at: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        slots: Tensor,
        tables: Tensor,
        lens: Tensor,
        scales: list[Tensor],
    ) -> Tensor:
        k_scale, v_scale = scales if scales else (None, None)  # int8 caches: one scale per token and head
        ops = torch.ops.tuili
        embed, inv_freq, final_norm, sm_scale = w[0], w[1], w[2], dim**-0.5
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
