"""Per-input-channel rescaling that leaves a decoder layer's function unchanged:
W' = W · diag(s) for the linears that read a tensor, and that tensor divided by s at its source
(an RMSNorm weight, or the rows of the linear that produced it). AWQ and SmoothQuant both choose
s; this module knows where it can be folded in a Llama-family layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn


@dataclass
class SmoothGroup:
    """Linears that read the same input, and the module whose output that input is."""

    source: nn.Module  # RMSNorm (scale its weight) or nn.Linear (scale its output rows)
    linears: dict[str, nn.Linear]  # name inside the layer -> module

    @property
    def first(self) -> str:
        return next(iter(self.linears))


def smooth_groups(layer: Any) -> list[SmoothGroup]:
    """The foldable groups of a decoder layer (tuili's and transformers' Llama-family layers alike)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [
        SmoothGroup(
            layer.input_layernorm,
            {"self_attn.q_proj": attn.q_proj, "self_attn.k_proj": attn.k_proj, "self_attn.v_proj": attn.v_proj},
        )
    ]
    if hasattr(mlp, "experts"):  # a mixture: the router and every expert read the normed input
        readers = {"mlp.gate": mlp.gate}
        for e, expert in enumerate(mlp.experts):
            readers |= {f"mlp.experts.{e}.gate_proj": expert.gate_proj, f"mlp.experts.{e}.up_proj": expert.up_proj}
        groups.append(SmoothGroup(layer.post_attention_layernorm, readers))  # (an expert's up → down: few rows)
    else:
        groups += [
            SmoothGroup(layer.post_attention_layernorm, {"mlp.gate_proj": mlp.gate_proj, "mlp.up_proj": mlp.up_proj}),
            SmoothGroup(mlp.up_proj, {"mlp.down_proj": mlp.down_proj}),
        ]
    # v_proj's rows feed o_proj's columns one to one only without GQA (a KV head serves several heads)
    if attn.q_proj.out_features == attn.v_proj.out_features:
        groups.append(SmoothGroup(attn.v_proj, {"self_attn.o_proj": attn.o_proj}))
    return [
        g
        for g in groups
        if all(isinstance(m, nn.Linear) for m in g.linears.values())
        and isinstance(g.source, nn.Module)
        and hasattr(g.source, "weight")
        and g.source.weight.dtype.is_floating_point
    ]


def smooth_targets(layer: nn.Module, local: Mapping[str, nn.Module]) -> list[SmoothGroup]:
    """The layer's foldable groups with at least one linear layer being quantized (in `local`)."""
    return [g for g in smooth_groups(layer) if any(n in local for n in g.linears)]


def group_scheme(group: SmoothGroup, schemes: dict):
    """The scheme of the group's first linear layer being quantized."""
    return schemes[next(n for n in group.linears if n in schemes)]


@torch.no_grad()
def apply_smoothing(group: SmoothGroup, s: Tensor) -> None:
    """Divide the source's output channel j by s_j and multiply every reader's input column j by s_j."""
    source = group.source
    if isinstance(source, nn.Linear):
        source.weight.div_(s[:, None].to(source.weight.dtype))
        if source.bias is not None:
            source.bias.div_(s.to(source.bias.dtype))
    else:
        weight = cast(Tensor, source.weight)
        weight.div_(s.to(weight.dtype))
    for linear in group.linears.values():
        linear.weight.mul_(s[None, :].to(linear.weight.dtype))


def weight_column_max(group: SmoothGroup) -> Tensor:
    """max_i |W_ij| over every reader of the group: (in_features,)."""
    return torch.stack([m.weight.detach().abs().amax(dim=0) for m in group.linears.values()]).amax(dim=0).float()
