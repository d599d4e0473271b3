"""The engine's decode step: one new token per sequence, the whole model in one C++ call.

On a small model a decode step is mostly overhead: about 400 Python-level kernel calls a token on
the default model, each with its module lookup, argument checks and a new tensor. The model's
module forward (tuili.models.llama) is the reference; `build_plan` reads from the model a typed
`StepPlan` (each linear layer's `KernelCall`, the norms, head counts and activation), and
csrc/decode_step.cpp runs the same kernel calls in the same order from one C++ call, so the logits
are the module forward's, bit for bit (tests hold it to that for every family and scheme).

The plan's `Checks` say whether the model is still the one the plan was made from: no module
replaced, no quantized layer's packed weights changed, no hook added (a hook means someone watches
the modules: then the module forward runs). The engine asks once per new request, not per token.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from tuili.engine.paged_cache import PagedKVCache
from tuili.kernels import ops as kernels
from tuili.kernels.contract import KernelCall
from tuili.models.attention import RotaryEmbedding, scale_embeddings, soft_cap
from tuili.models.llama import MLP, LlamaForCausalLM, SparseMoE

_MISSING = object()
LINEARS: tuple[tuple[str, str], ...] = tuple(
    ("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
) + tuple(("mlp", n) for n in ("gate_proj", "up_proj", "down_proj"))


def hooked(modules: tuple[nn.Module, ...]) -> bool:
    """Whether a forward hook (global, or on one of `modules`) watches these calls."""
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules
    )


def bf16_step(model_dtype: torch.dtype, compute_dtype: torch.dtype | None) -> bool:
    """Whether a decode step runs its quantized layers' bf16 kernels: a bf16 model, or an fp32 one
    under `compute_dtype(torch.bfloat16)`."""
    return torch.bfloat16 in (compute_dtype, model_dtype)


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer: its two RMSNorm weights, its linear layers' calls, and what families
    add: the RMSNorm weights of each head's q and k (Qwen3, Gemma 3) and of the attention's and
    the MLP's outputs (Gemma), its sliding window and RoPE, its experts (Qwen3-MoE, Mixtral)."""

    input_norm: Tensor
    post_norm: Tensor
    calls: tuple[KernelCall, ...]  # q, k, v, o, then gate, up, down (LINEARS' order) or router, each expert's three
    qk_norms: tuple[Tensor, Tensor] | None = None
    output_norms: tuple[Tensor, Tensor] | None = None
    window: int = 0  # 0: none
    local_rope: bool = False  # rotates by the model's local RoPE (Gemma 3's sliding-window layers)
    experts: int = 0  # a mixture's experts (0: a dense MLP)


@dataclass(frozen=True)
class StepPlan:
    """What the C++ step reads from a model."""

    embed: Tensor | nn.Module  # the table, or a module that looks rows up (one reading a quantized head's codes)
    embed_scale: float | None
    rope: RotaryEmbedding  # cos and sin of the new tokens' positions (computed in Python)
    local_rope: RotaryEmbedding | None
    layers: tuple[LayerPlan, ...]
    final_norm: Tensor
    head: KernelCall
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    activation: str
    sm_scale: float
    softcap: float | None  # on attention scores
    final_softcap: float | None  # on logits
    top_k: int = 0  # experts each token runs, in the mixture layers
    normalize: bool = False  # the chosen experts' weights renormalized

    @cached_property
    def max_rows(self) -> int:
        """Sequences per step up to which every layer's kernel applies."""
        return min(c.max_rows for c in self.calls())

    def calls(self) -> list[KernelCall]:
        return [c for layer in self.layers for c in layer.calls] + [self.head]

    def native(self):
        """The extension's DecodePlan for this plan."""
        calls = self.calls()
        norms = [
            w for layer in self.layers for w in (layer.input_norm, layer.post_norm, *(layer.output_norms or ()))
        ] + [self.final_norm]
        qk_norms = [w for layer in self.layers for w in (layer.qk_norms or ())]
        output_norms = self.layers[0].output_norms is not None
        return kernels.extension().DecodePlan(
            [c.name for c in calls],
            [list(c.tensors) for c in calls],
            [list(c.ints) for c in calls],
            [c.bias for c in calls],
            norms,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.eps,
            [layer.window for layer in self.layers],
            self.activation,
            qk_norms,
            self.sm_scale,
            self.softcap or 0.0,
            [layer.local_rope for layer in self.layers],
            output_norms,
            [c.small.name if c.small else "" for c in calls],
            [list(c.small.tensors) if c.small else [] for c in calls],
            [list(c.small.ints) if c.small else [] for c in calls],
            [c.small_rows if c.small else 0 for c in calls],
            [layer.experts for layer in self.layers],
            self.top_k,
            self.normalize,
        )


class Checks:
    """What must still hold for a plan to apply: each module and float weight the step reads still
    sits where it sat (`parent[name] is child`), no hook watches a module, and no quantized layer's
    cached kernel call was dropped. Kept as parallel lists so that one check of ~500 entries is a
    few C-level `map`s (~40 µs), not a Python loop (~370 µs)."""

    def __init__(self) -> None:
        self.parents: list[dict] = []
        self.names: list[str] = []
        self.children: list[object] = []
        self.hooks: list[dict] = []  # every module's forward (pre-)hook dicts
        self.owners: list[dict] = []  # layers' __dict__ ...
        self.keys: list[str] = []  # ... where their kernel calls are cached ...
        self.calls: list[object] = []  # ... and what was cached there

    def add(self, parent: dict, name: str, child: object) -> None:
        """`parent[name]` must stay `child` (None: stay absent); a module must stay unhooked."""
        self.parents.append(parent)
        self.names.append(name)
        self.children.append(child)
        if isinstance(child, nn.Module):
            self.watch(child)

    def cached(self, owner: nn.Module, key: str) -> None:
        """What `owner` caches under `key` (its kernel call) must stay what it is now."""
        self.owners.append(owner.__dict__)
        self.keys.append(key)
        self.calls.append(owner.__dict__.get(key, _MISSING))

    def watch(self, module: nn.Module) -> None:
        """No hook may be added to `module`."""
        self.hooks += (module._forward_hooks, module._forward_pre_hooks)

    def still(self) -> bool:
        if hooked(()):
            return False
        return (
            all(map(operator.is_, map(dict.get, self.parents, self.names), self.children))
            and not any(self.hooks)
            and all(map(operator.is_, map(dict.get, self.owners, self.keys, repeat(_MISSING)), self.calls))
        )


def build_plan(module: Any, bf16: bool) -> tuple[Checks, StepPlan | None] | None:
    """What must still hold for the plan to apply, and the plan. The plan is None where a layer has
    no kernel call (the checks then say when to look again); None in all where a hook watches.
    `module` is read by its parts' Hugging Face names (a LlamaForCausalLM), hence `Any`."""
    if kernels.extension() is None or hooked(()):
        return None
    backbone = module._modules["model"]
    parts = backbone._modules
    embed, final_norm, layer_list = parts["embed_tokens"], parts["norm"], parts["layers"]
    checks = Checks()
    checks.watch(module)  # the root: only its hooks (the checks must not keep it alive)
    for parent, name in ((module._modules, "model"), (parts, "embed_tokens"), (parts, "norm"), (parts, "layers")):
        checks.add(parent, name, parent[name])
    checks.add(module._modules, "rotary_emb", module.rotary_emb)
    checks.add(module._modules, "rotary_emb_local", module.rotary_emb_local)
    for name, layer in layer_list._modules.items():
        checks.add(layer_list._modules, name, layer)
    checks.add(layer_list._modules, str(len(layer_list)), None)  # no layer appended

    def call(parent: Any, name: str) -> KernelCall | None:
        child = parent._modules[name]
        checks.add(parent._modules, name, child)
        make = getattr(child, "kernel_call", None)
        if make is None or getattr(child, "input_order", None) is not None:  # permuted inputs: the module's
            return None
        made = make(bf16)  # first: a quantized layer caches it, and the checks record that
        key = "_bf16_kernel_call" if bf16 else "_kernel_call"
        if key in child.__dict__:
            checks.cached(child, key)
        for param in ("weight", "bias"):  # a float layer's: read as they are now (pruning may assign new ones)
            if param in child._parameters:
                checks.add(child._parameters, param, child._parameters[param])
        return made

    layers = []
    for layer in layer_list:
        sub = layer._modules
        for name, child in sub.items():
            checks.add(sub, name, child)
        mlp = sub["mlp"]
        if type(mlp) not in (MLP, SparseMoE):
            return checks, None
        calls = tuple(call(sub["self_attn"], name) for _, name in LINEARS[:4]) + mlp_calls(mlp, call, checks)
        attn = sub["self_attn"]
        layers.append(
            LayerPlan(
                weight(sub["input_layernorm"], checks),
                weight(sub["post_attention_layernorm"], checks),
                calls,  # type: ignore[arg-type]
                norm_pair(attn._modules, "q_norm", "k_norm", checks),
                norm_pair(sub, "attn_output_norm", "mlp_output_norm", checks),
                attn.sliding_window or 0,
                attn.local_rope,
                len(mlp.experts) if type(mlp) is SparseMoE else 0,
            )
        )
    head = call(module, "lm_head")
    table = type(embed) is nn.Embedding
    embedding, norm_weight = weight(embed, checks) if table else embed, weight(final_norm, checks)
    if not checks.still():  # a hook watches one of the modules: the module forward calls them
        return None
    norms = [norm_weight] + [
        w for p in layers for w in (p.input_norm, p.post_norm, *(p.qk_norms or ()), *(p.output_norms or ()))
    ]
    if (
        not (table or getattr(embed, "dtype", None) == norm_weight.dtype)  # a module: its rows in the stream's dtype
        or head is None
        or any(None in p.calls for p in layers)
        or any(w.dtype != norm_weight.dtype for w in norms)  # the C++ step keeps one dtype for the stream
        or (table and embedding.dtype != norm_weight.dtype)
    ):
        return checks, None
    attn, mlp = layer_list[0]._modules["self_attn"], layer_list[0]._modules["mlp"]
    sparse = [layer._modules["mlp"] for layer in layer_list if type(layer._modules["mlp"]) is SparseMoE]
    if type(mlp) is SparseMoE:
        mlp = mlp.experts[0]
    config = module.config
    plan = StepPlan(
        embed=embedding,
        embed_scale=config.embed_scale,
        rope=module.rotary_emb,
        local_rope=module.rotary_emb_local,
        layers=tuple(layers),
        final_norm=norm_weight,
        head=head,
        heads=attn.num_heads,
        kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        eps=final_norm.eps,
        activation=getattr(mlp, "activation", ""),
        sm_scale=attn.scale,
        softcap=attn.softcap,
        final_softcap=config.final_softcap,
        top_k=sparse[0].top_k if sparse else 0,
        normalize=bool(sparse and sparse[0].normalize),
    )
    return checks, plan


def mlp_calls(mlp: Any, call, checks: Checks) -> tuple[KernelCall | None, ...]:
    """A dense MLP's gate, up and down; a mixture's router, then each expert's gate, up and down."""
    projections = ("gate_proj", "up_proj", "down_proj")
    if type(mlp) is MLP:
        return tuple(call(mlp, name) for name in projections)
    experts = mlp._modules["experts"]
    checks.add(mlp._modules, "experts", experts)
    checks.add(experts._modules, str(len(experts)), None)  # no expert appended
    calls = [call(mlp, "gate")]
    for name, expert in experts._modules.items():
        checks.add(experts._modules, name, expert)
        calls += [call(expert, p) for p in projections]
    return tuple(calls)


def norm_pair(parts: dict, first: str, second: str, checks: Checks) -> tuple[Tensor, Tensor] | None:
    """Two optional RMSNorms' weights (a family's q/k norms, or Gemma's norms on the attention's and
    the MLP's outputs), None where the module has not both; the checks hold either way."""
    a, b = parts.get(first), parts.get(second)
    checks.add(parts, first, a)
    checks.add(parts, second, b)
    if a is None or b is None:
        return None
    return weight(a, checks), weight(b, checks)


def weight(module: Any, checks: Checks) -> Tensor:
    """module.weight, with a check that it is still that tensor (pruning may assign a new one)."""
    checks.add(module._parameters, "weight", module.weight)
    return module.weight


class DecodeStep:
    """The C++ decode step of one model, as an engine holds it: a plan for each kind of activations
    (bf16 or fp32: which kernel each quantized layer runs), rebuilt when the model changes."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._plans: dict[bool, tuple[Checks, StepPlan | None, Any]] = {}

    def __call__(
        self,
        cache: PagedKVCache,
        ids: Tensor,
        positions: Tensor,
        logits_at: Tensor,
        compute_dtype: torch.dtype | None,
        check: bool = True,
    ) -> Tensor | None:
        """Logits (len(logits_at), V) for token ids (N,) at positions (N,), one per sequence of the
        cache's bound step; None where the C++ step does not apply (the caller runs the module).
        `check`: look again whether the model still matches the plan (the engine asks once per new
        request: with the weights streaming through the caches each step, the ~500 objects the
        check reads are cold, 0.34 ms of a 4 ms step, measured)."""
        module = self.module
        if type(module) is not LlamaForCausalLM or torch.is_grad_enabled() or not cache.decoding:
            return None
        planned = self._plan(bf16_step(module.dtype, compute_dtype), check)
        if planned is None or ids.shape[0] > planned[0].max_rows:
            return None
        plan, native = planned
        rows = F.embedding(ids, plan.embed) if isinstance(plan.embed, Tensor) else plan.embed(ids)
        x = scale_embeddings(rows, plan.embed_scale)
        cos, sin = plan.rope(positions[None], x.dtype)
        local = (None, None) if plan.local_rope is None else plan.local_rope(positions[None], x.dtype)
        step = cache._step
        assert step is not None  # cache.decoding
        caches = (cache.k, cache.v, cache.k_scale, cache.v_scale)
        logits = native.step(x, cos, sin, *local, *caches, step.slots, step.tables, step.decode_lens, logits_at)
        return soft_cap(logits, plan.final_softcap)

    def max_rows(self, compute_dtype: torch.dtype | None) -> int:
        """Rows a step may have and still run the C++ step (its kernels' limit), as last planned;
        64 where it does not run (the module forward takes any number)."""
        module = self.module
        planned = self._plans.get(bf16_step(module.dtype, compute_dtype)) if type(module) is LlamaForCausalLM else None
        return planned[1].max_rows if planned is not None and planned[1] is not None else 64

    def applies(self, compute_dtype: torch.dtype | None) -> bool:
        """Whether decode steps under this compute dtype run the C++ step, looked at now."""
        if type(self.module) is not LlamaForCausalLM:
            return False
        return self._plan(bf16_step(self.module.dtype, compute_dtype)) is not None

    def _plan(self, bf16: bool, check: bool = True) -> tuple[StepPlan, Any] | None:
        planned = self._plans.get(bf16)
        if planned is None or (check and not planned[0].still()):
            made = build_plan(self.module, bf16)  # type: ignore[arg-type]
            if made is None:  # a hook: nothing cached, looked at again next step
                self._plans.pop(bf16, None)
                return None
            checks, plan = made
            planned = self._plans[bf16] = (checks, plan, None if plan is None else plan.native())
        return None if planned[1] is None else (planned[1], planned[2])

    def release(self) -> None:
        """Drop the plans, and with them their hold on the weights they read: a model quantized or
        pruned in place after this frees its old weights at once, not at its next decode step."""
        self._plans.clear()
