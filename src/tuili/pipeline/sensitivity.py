"""Per-layer sensitivity to quantization: what each layer's choice of format costs in quality, in
bytes and in decode time, measured on the model itself.

Quality: the loss increase predicted by the diagonal Fisher information (HAWQ, "Optimal Brain
Compression"): with F = E[g²] the squared gradients of the next-token loss on calibration text,
quantizing W to Ŵ raises the loss by about ΔL ≈ ½ Σ F ⊙ (W − Ŵ)². One backward pass per sample
measures F for every layer at once; each option's Ŵ is the layer tuili would build (round to
nearest). Bytes: the quantized layer's tensors. Time: the layer's kernel at one row (batch-1
decode), timed on this CPU under the engine's activations, once per distinct shape.

`tuili.quant.sensitivity` measures one scheme's per-layer output error (and, slowly, perplexity
with one layer quantized) for `tuili quantize --analyze`; this module gives the planner a
loss-scaled figure for every option at once, from one pass of gradients.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuili.kernels.ops import bf16_is_fast
from tuili.models.lazy import onload_all
from tuili.models.memory import return_freed_memory
from tuili.models.model import Model
from tuili.models.selection import select_linears
from tuili.pipeline.analysis import module_bytes
from tuili.quant.api import quantize_layer
from tuili.quant.config import Int4WeightOnly, Int8WeightOnly, QuantScheme
from tuili.quant.kernel_layer import compute_dtype

# the formats a layer may take: float (kept), int8 per channel, int4 in groups of 32 or 128
OPTIONS: dict[str, QuantScheme | None] = {
    "float": None,
    "int8": Int8WeightOnly(),
    "int4-g32": Int4WeightOnly(32),
    "int4-g128": Int4WeightOnly(128),
}
HEAD_OPTIONS = ("float", "int8")  # the head decides every token: 4-bit heads cost far more quality


@dataclass
class LayerCost:
    """One linear layer: per option, predicted loss increase (nats/token), bytes and seconds per token."""

    name: str
    shape: tuple[int, int]  # (out, in)
    delta: dict[str, float] = field(default_factory=dict)
    num_bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def is_tied(module: nn.Module, name: str) -> bool:
    """Whether layer `name` shares its weight with the input embedding (then keeping it float costs no bytes)."""
    weight = module.get_submodule(name).weight
    return any(isinstance(m, nn.Embedding) and m.weight.data_ptr() == weight.data_ptr() for m in module.modules())


def fisher_diagonal(module: nn.Module, names: list[str], samples: Tensor) -> dict[str, Tensor]:
    """E[g²] of each named linear weight over the rows of `samples` (N, T) token ids, one sample per
    backward pass (squared per-sample gradients, not the square of their mean)."""
    weights = {name: module.get_submodule(name).weight for name in names}
    flags = {name: w.requires_grad for name, w in weights.items()}
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    was_training = module.training
    module.eval()
    try:
        for p in module.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for row in samples:
                ids = row[None]
                logits = module(ids)
                logits = logits if isinstance(logits, Tensor) else logits.logits
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                grads = torch.autograd.grad(loss, list(weights.values()))
                for name, g in zip(weights, grads):
                    fisher[name].add_(g.float().square())
    finally:
        for name, w in weights.items():
            w.requires_grad_(flags[name])
        module.train(was_training)
    return {name: f.div_(len(samples)) for name, f in fisher.items()}


def _seconds_per_call(layer: nn.Module, in_features: int, stream_bytes: int = 64 * 2**20) -> float:
    """Batch-1 seconds of `layer` with its weights coming from memory, as in decoding (a model's
    layers do not fit in cache): copies of it totalling `stream_bytes` are called in turn."""
    copies = [layer] + [copy.deepcopy(layer) for _ in range(min(63, stream_bytes // max(1, module_bytes(layer))))]
    x = torch.randn(1, in_features)
    with torch.no_grad(), compute_dtype(torch.bfloat16 if bf16_is_fast() else None):
        for c in copies[:3]:
            c(x)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for c in copies:
                c(x)
            best = min(best, (time.perf_counter() - start) / len(copies))
    return best


def layer_costs(
    model: Model, samples: Tensor, options: dict[str, QuantScheme | None] = OPTIONS, time_layers: bool = True
) -> list[LayerCost]:
    """Every quantizable linear layer (the head included) with each option's predicted loss
    increase, bytes and batch-1 seconds. The model is left as it was."""
    module = model.module
    onload_all(module)  # gradients for every layer at once
    linears = select_linears(module, ignore=())
    fisher = fisher_diagonal(module, list(linears), samples)
    timed: dict[tuple, float] = {}
    costs = []
    for name, linear in linears.items():
        cost = LayerCost(name, tuple(linear.weight.shape))
        allowed = HEAD_OPTIONS if name == "lm_head" else options
        w = linear.weight.detach().float()
        for option in allowed:
            scheme = options[option]
            if (getattr(scheme, "group_size", None) or 0) > linear.in_features:
                continue  # groups longer than the row: not a format this layer can take
            layer = linear if scheme is None else quantize_layer(linear, scheme)
            if scheme is None:
                cost.delta[option] = 0.0
                cost.num_bytes[option] = 0 if is_tied(module, name) else module_bytes(linear)
            else:
                cost.delta[option] = 0.5 * float((fisher[name] * (w - layer.dequantize()).square()).sum())
                cost.num_bytes[option] = module_bytes(layer)
            if time_layers:
                key = (cost.shape, option)
                if key not in timed:
                    timed[key] = _seconds_per_call(layer, cost.shape[1])
                cost.seconds[option] = timed[key]
        costs.append(cost)
    del fisher
    return_freed_memory()  # the gradients' freed heap: the peak measured after this is the model's
    return costs


__all__ = ["HEAD_OPTIONS", "OPTIONS", "LayerCost", "fisher_diagonal", "is_tied", "layer_costs"]
