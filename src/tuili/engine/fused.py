"""The engine's decode step in one C++ call (csrc/decode_step.cpp), the default for tuili's Llama.

The Python decode step (tuili.engine.decode) calls a kernel per linear layer, norm, RoPE and
attention, with a module lookup, argument checks and a new tensor for each: about 400 calls a
token on the default model, 1.5 ms of a 5 ms W8A16 step (measured). Here a `DecodePlan` built
once from the model (`tuili.engine.plan`: each layer's kernel and weights) makes the same kernel
calls in the same order from C++, so the logits are the same and the Python is gone. Whenever the
engine gets a new request the plan is checked against the model (`plan.Checks`): a replaced
module, new packed weights or a hook make it rebuild, or step aside for the Python path.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

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

_FUSED: weakref.WeakKeyDictionary[nn.Module, FusedDecode] = weakref.WeakKeyDictionary()
_disabled = False


class FusedDecode(ModelStep):
    """The C++ decode step of one fp32 LlamaForCausalLM, a plan for each kind of activations (bf16
    or fp32: which kernel each quantized layer runs)."""

    def __init__(self, module: LlamaForCausalLM):
        super().__init__(module)
        self._plans: dict[bool, tuple[Checks, StepSpec | None, Tensor | None, object]] = {}

    def __call__(
        self, cache: PagedKVCache, ids: Tensor, positions: Tensor, logits_at: Tensor, bf16: bool, check: bool = True
    ) -> Tensor | None:
        """Logits as `decode_step` computes them, or None where this step must run in Python."""
        planned = self._plan(bf16, check)
        if planned is None or ids.shape[0] > planned[1].max_rows:
            return None
        _, _, embed, plan = planned
        x = F.embedding(ids, embed)
        cos, sin = rope_cos_sin(self.module.inv_freq, positions[None], x.dtype)
        step = cache._step
        return plan.step(
            x,
            cos,
            sin,
            cache.k,
            cache.v,
            cache.k_scale,
            cache.v_scale,
            step.slots,
            step.tables,
            step.decode_lens,
            logits_at,
        )

    def _plan(self, bf16: bool, check: bool = True) -> tuple[Checks, StepSpec, Tensor, object] | None:
        """(checks, spec, embedding, DecodePlan) for this kind of step, rebuilt where the model
        changed; None where the plan cannot run (a layer no kernel takes, a hook, a bf16 model)."""
        planned = self._plans.get(bf16)
        if planned is None or (check and not planned[0].still()):
            made = build_plan(self.module, bf16)
            if made is None:  # a hook: nothing cached, looked at again next step
                self._plans.pop(bf16, None)
                return None
            checks, spec, tensors = made
            fits = spec is not None and self.module.dtype == torch.float32
            planned = self._plans[bf16] = (
                checks,
                spec if fits else None,
                tensors[0] if fits else None,
                _decode_plan(spec, tensors) if fits else None,
            )
        return planned if planned[1] is not None else None

    def release(self) -> None:
        """Drop the plans, and with them their hold on the weights they read: a model quantized or
        pruned in place after this frees its old weights at once, not at its next decode step."""
        self._plans.clear()


def cpp_step_applies(module: nn.Module, bf16: bool | None = None) -> bool:
    """Whether the engine's decode steps over `module` run the C++ step (`bf16`: with bf16
    activations; default: as the engine chooses), looked at now and not kept."""
    fused = fused_decode(module)
    if fused is None:
        return False
    if bf16 is None:
        bf16 = bf16_step(module.dtype, engine_compute_dtype(module.dtype))
    applies = fused._plan(bf16) is not None
    fused.release()
    return applies


def release_plans(module: nn.Module) -> None:
    """`FusedDecode.release` for this module's C++ step, if it has one (the engine calls it when it
    runs out of requests: the next one checks the model anyway, and a plan for the default model
    builds in about 1 ms)."""
    fused = _FUSED.get(module)
    if fused is not None:
        fused.release()


def _decode_plan(spec: StepSpec, tensors: list[Tensor]):
    """The C++ DecodePlan for a spec and its weights in `build_plan`'s order (embedding, RoPE
    frequencies, final norm; per layer two norms and seven linear layers; the head)."""
    ops, args, ints, biases, norms = [], [], [], [], []
    at = 3

    def linear(s: LinearSpec) -> None:
        nonlocal at
        layer_tensors, layer_ints = [], []
        for a in s.args:
            if a == TENSOR:
                layer_tensors.append(tensors[at])
                at += 1
            elif a is None:  # an optional tensor left out (W8A8's dynamic input scale)
                layer_tensors.append(None)
            else:
                layer_ints.append(int(a))
        bias = None
        if s.bias:
            bias, at = tensors[at], at + 1
        ops.append(s.op)
        args.append(layer_tensors)
        ints.append(layer_ints)
        biases.append(bias)

    for layer in spec.layers:
        norms += tensors[at : at + 2]
        at += 2
        for s in layer:
            linear(s)
    linear(spec.head)
    norms.append(tensors[2])
    return kernels.extension().DecodePlan(
        ops, args, ints, biases, norms, spec.heads, spec.kv_heads, spec.head_dim, spec.eps, spec.window
    )


def fused_decode(module: nn.Module) -> FusedDecode | None:
    """The C++ decode step for tuili's Llama models where the kernels are built (None elsewhere,
    and inside `python_decode()`)."""
    if _disabled or type(module) is not LlamaForCausalLM or kernels.extension() is None:
        return None
    fused = _FUSED.get(module)
    if fused is None:
        fused = _FUSED[module] = FusedDecode(module)
    return fused


@contextmanager
def python_decode() -> Iterator[None]:
    """The C++ step stands aside inside the block: decode steps run the Python loop (tests and
    benchmarks compare them)."""
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before
