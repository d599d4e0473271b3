"""What a decode step reads from a model: every linear layer's kernel call and the weights, in order.

The engine's fast decode step (tuili.engine.fused: one C++ call) runs a Llama decode step straight
through tuili's kernels. `build_plan` lists what it needs from the model (a `StepSpec`: each linear
layer's kernel and constant arguments, the head counts, the norm's eps) and the weights in the
order the step reads them, and its `Checks` tell whether the model is still the one the plan was
made from: no module replaced, no quantized layer's packed weights changed, no hook added (a hook
means someone watches the modules: then the eager path runs them).
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tuili.kernels import ops as kernels
from tuili.models.llama import Linear, LlamaForCausalLM, hooked
from tuili.quant.linear import _KernelLinear


def bf16_step(model_dtype: torch.dtype, compute_dtype: torch.dtype | None) -> bool:
    """Whether a decode step runs its quantized layers' bf16 kernels: a bf16 model, or an fp32 one
    under `compute_dtype(torch.bfloat16)` (what `engine_compute_dtype` picks where bf16 is fast)."""
    return torch.bfloat16 in (compute_dtype, model_dtype)


class ModelStep:
    """A fast decode step of one model. It holds the model weakly: the registry that maps models
    to their steps is keyed by the model, and a strong hold would keep every model alive."""

    def __init__(self, module: LlamaForCausalLM):
        self._module = weakref.ref(module)

    @property
    def module(self) -> LlamaForCausalLM:
        return self._module()


TENSOR = "tensor"  # in a LinearSpec's args: the next tensor of the step's weights


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer's call: a tuili operator and its arguments after x (TENSOR for each tensor,
    constants as they are), then the bias if any."""

    op: str
    args: tuple
    bias: bool


@dataclass(frozen=True)
class StepSpec:
    """The step's layout: everything but the tensors."""

    layers: tuple[tuple[LinearSpec, ...], ...]  # q, k, v, o, gate, up, down per layer
    head: LinearSpec
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    window: int  # sliding window (0: none)
    max_rows: int  # sequences per step up to which every layer's kernel applies


def linear_plan(module: nn.Module, bf16: bool) -> tuple[LinearSpec, list[Tensor], int] | None:
    """A layer's call, its tensors and the rows up to which it applies; None for a layer no
    kernel takes (then the eager path runs)."""
    if isinstance(module, _KernelLinear):
        args = module.bf16_kernel_args() if bf16 else module.kernel_args()
        if not args:
            return None
        name, rest, bias = args[0], args[1:-1], args[-1]
        tensors = [a for a in rest if isinstance(a, Tensor)] + ([bias] if bias is not None else [])
        layout = tuple(TENSOR if isinstance(a, Tensor) else a for a in rest)
        return LinearSpec(name, layout, bias is not None), tensors, kernels.MAX_ROWS[name]
    # float layers: tuili's fp32 GEMV, which is what the eager step runs up to MAX_M_F32 rows (above
    # that, F.linear inside the graph measured 5× slower than eager oneDNN: those steps run eagerly)
    if (
        type(module) in (Linear, nn.Linear)
        and module.weight.dtype == torch.float32
        and module.weight.is_contiguous()
        and kernels.f32_gemv()
    ):
        spec = LinearSpec("f32_linear", (TENSOR, None), module.bias is not None)
        return spec, [module.weight] + ([module.bias] if module.bias is not None else []), kernels.MAX_M_F32
    return None


class Checks:
    """What must still hold for a plan to apply, checked when the engine asks (once per new
    request): each module and float weight the step reads still sits where it sat (`parent[name]
    is child`), no hook watches a module, and no quantized layer's cached kernel arguments were
    dropped. Kept as parallel lists
    so that one check of ~500 entries is a few C-level `map`s (~40 µs), not a Python loop (~370 µs)."""

    def __init__(self):
        self.parents: list[dict] = []
        self.names: list[str] = []
        self.children: list[object] = []
        self.hooks: list[dict] = []  # every module's forward (pre-)hook dicts
        self.owners: list[dict] = []  # quantized layers' __dict__ ...
        self.keys: list[str] = []  # ... where their kernel arguments are cached ...
        self.args: list[object] = []  # ... and what was cached there

    def add(self, parent: dict, name: str, child: object, bf16: bool | None = None) -> None:
        """`parent[name]` must stay `child` (None: stay absent); for a module, unhooked; for a
        quantized layer (with `bf16` given), its kernel arguments for those activations unchanged."""
        self.parents.append(parent)
        self.names.append(name)
        self.children.append(child)
        if isinstance(child, nn.Module):
            self.watch(child)
            if bf16 is not None and isinstance(child, _KernelLinear):
                key = "_bf16_kernel_args" if bf16 else "_kernel_args"
                self.owners.append(child.__dict__)
                self.keys.append(key)
                self.args.append(child.__dict__.get(key))

    def watch(self, module: nn.Module) -> None:
        """No hook may be added to `module`."""
        self.hooks += (module._forward_hooks, module._forward_pre_hooks)

    def still(self) -> bool:
        if hooked(()):
            return False
        return (
            all(map(operator.is_, map(dict.get, self.parents, self.names), self.children))
            and not any(self.hooks)
            and all(map(operator.is_, map(dict.get, self.owners, self.keys), self.args))
        )


def build_plan(module: LlamaForCausalLM, bf16: bool) -> tuple[Checks, StepSpec | None, list[Tensor]] | None:
    """What must still hold for the plan to apply, the layout, and the weights in the order the
    step reads them. The layout is None where a linear layer has no kernel (the checks then say
    when to look again); None in all where a hook watches the model."""
    if kernels.extension() is None or hooked(()):
        return None
    backbone = module._modules["model"]
    parts = backbone._modules
    embed, final_norm, layer_list = parts["embed_tokens"], parts["norm"], parts["layers"]
    checks = Checks()
    checks.watch(module)  # the root: only its hooks (the checks must not keep it alive)
    checks.add(module._modules, "model", backbone)
    checks.add(parts, "embed_tokens", embed)
    checks.add(parts, "norm", final_norm)
    checks.add(module._buffers, "inv_freq", module.inv_freq)
    for name, layer in layer_list._modules.items():
        checks.add(layer_list._modules, name, layer)
    checks.add(layer_list._modules, str(len(layer_list)), None)  # no layer appended
    if type(embed) is not nn.Embedding:
        return checks, None, []
    tensors: list[Tensor] = [weight(embed, checks), module.inv_freq, weight(final_norm, checks)]
    max_rows = 1 << 30

    def linear(parent: nn.Module, name: str) -> LinearSpec | None:
        nonlocal max_rows
        child = parent._modules[name]
        made = linear_plan(child, bf16)  # first: it caches the layer's kernel arguments, which the check records
        checks.add(parent._modules, name, child, bf16)
        if made is None:
            return None
        if not isinstance(child, _KernelLinear):  # a float layer: its weight is read as it is now
            weight(child, checks)
            if child.bias is not None:
                checks.add(child._parameters, "bias", child.bias)
        tensors.extend(made[1])
        max_rows = min(max_rows, made[2])
        return made[0]

    layers = []
    for layer in layer_list:
        sub = layer._modules
        attn, mlp = sub["self_attn"], sub["mlp"]
        for name, child in sub.items():
            checks.add(sub, name, child)
        tensors += [weight(sub["input_layernorm"], checks), weight(sub["post_attention_layernorm"], checks)]
        specs = tuple(
            [linear(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            + [linear(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        )
        layers.append(specs)
    head = linear(module, "lm_head")
    if head is None or any(None in specs for specs in layers):
        return checks, None, []
    attn = layer_list[0]._modules["self_attn"]
    spec = StepSpec(
        tuple(layers),
        head,
        attn.num_heads,
        attn.num_kv_heads,
        attn.head_dim,
        final_norm.eps,
        module.config.sliding_window or 0,
        max_rows,
    )
    if not checks.still():  # a hook watches one of the modules: the eager path calls them
        return None
    return checks, spec, tensors


def weight(module: nn.Module, checks: Checks) -> Tensor:
    """module.weight, with a check that it is still that tensor (pruning may assign a new one)."""
    checks.add(module._parameters, "weight", module.weight)
    return module.weight
