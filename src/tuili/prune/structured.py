"""Structured pruning that physically shrinks the model: MLP neurons, a mixture's experts, attention
heads, whole layers.

The smaller model is an ordinary tuili model with an updated config (uniform across layers, so
it saves as a Hugging Face folder, loads back, and runs in the engine), and computes exactly what
the dense model computes with the removed parts masked to zero.

Importance (LLM-Pruner's and ShortGPT's criteria):
- neurons: "l1" / "l2" of the neuron's weights (its gate and up rows and down column),
  "activation" ‖h_j‖₂ · ‖down[:, j]‖₂ over calibration tokens (h the down projection's input),
  "taylor" Σ |w · ∂L/∂w| over the neuron's weights
- experts: "frequency", the router probability each expert receives over calibration tokens (the
  experts that are rarely chosen go), or "l2" of the expert's weights; the router loses their rows
- heads: "l2" of the head's q rows and o columns, "activation" ‖head output‖₂ · ‖o columns‖₂;
  query heads are removed in equal numbers from every KV group (or whole KV groups with their
  query heads), so grouped-query attention stays valid
- layers: ShortGPT's block influence 1 − E[cos(x_in, x_out)]: the layers that change their input
  least go first
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from tuili.models.layerwise import input_hooks
from tuili.models.lazy import onload_all
from tuili.models.llama import Linear, LlamaForCausalLM
from tuili.models.model import Model
from tuili.prune.importance import InputNorms, taylor
from tuili.quant.linear import quantized_layers

NEURON_IMPORTANCE = ("l1", "l2", "activation", "taylor")
EXPERT_IMPORTANCE = ("frequency", "l2")
HEAD_IMPORTANCE = ("l2", "activation")


def _module(model: Model) -> LlamaForCausalLM:
    quantized = quantized_layers(model.module)
    if quantized:
        raise ValueError(f"{quantized[0]} is quantized: prune structurally before quantizing")
    onload_all(model.module)  # ranks rows and heads across the whole model
    return model.module


def _set_config(model: Model, **changes) -> None:
    """The new sizes, checked, written into the model's config object itself: the model, its module
    and its attention layers (which read the KV cache format from it) share that one object."""
    checked = dataclasses.replace(model.config, **changes)
    for f in dataclasses.fields(checked):
        setattr(model.config, f.name, getattr(checked, f.name))
    model.module.config = model.config


def _fraction(fraction: float, what: str) -> None:
    if not 0 <= fraction < 1:
        raise ValueError(f"the fraction of {what} to remove must be in [0, 1), got {fraction}")


def _shrunk(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> Linear:
    """A tuili Linear holding the kept output rows / input columns of `linear`."""
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = Linear(w.shape[1], w.shape[0], bias=linear.bias is not None).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return new


@torch.no_grad()
def _input_norms(
    module: LlamaForCausalLM, linears: list[nn.Linear], calib: Tensor, batch_size: int = 4
) -> list[Tensor]:
    """‖x_j‖₂ over calibration tokens of each linear's input columns (one pass of the whole model)."""
    stats = [InputNorms(m.in_features) for m in linears]
    with input_hooks({str(i): m for i, m in enumerate(linears)}, lambda name, x: stats[int(name)].add(x)):
        for start in range(0, calib.shape[0], batch_size):
            module(calib[start : start + batch_size].to(module.device))
    return [s.value() for s in stats]


def _scored_module(
    model: Model, importance: str, choices: tuple[str, ...], what: str, calib: Tensor | None
) -> LlamaForCausalLM:
    """The model's module, once the importance is known and has the calibration it needs."""
    if importance not in choices:
        raise ValueError(f"unknown {what} importance {importance!r}: choose one of {', '.join(choices)}")
    if importance in ("activation", "taylor") and calib is None:
        raise ValueError(f"{importance} importance needs calibration token ids (calib=...)")
    return _module(model)


def neuron_scores(model: Model, importance: str = "activation", calib: Tensor | None = None) -> list[Tensor]:
    """One score per intermediate neuron, per decoder layer."""
    module = _scored_module(model, importance, NEURON_IMPORTANCE, "neuron", calib)
    if model.config.num_experts:
        raise ValueError("a mixture of experts: remove whole experts (prune_experts_, experts=F), not MLP neurons")
    mlps = [layer.mlp for layer in module.model.layers]
    if importance == "activation":
        norms = _input_norms(module, [m.down_proj for m in mlps], calib)
        return [n * m.down_proj.weight.detach().float().norm(dim=0).cpu() for n, m in zip(norms, mlps)]
    if importance == "taylor":
        linears = {f"{i}.{p}": getattr(m, p) for i, m in enumerate(mlps) for p in ("gate_proj", "up_proj", "down_proj")}
        t = taylor(module, linears, calib, progress=False)
        return [
            (t[f"{i}.gate_proj"].sum(1) + t[f"{i}.up_proj"].sum(1) + t[f"{i}.down_proj"].sum(0)).cpu()
            for i in range(len(mlps))
        ]
    p = 1 if importance == "l1" else 2
    return [
        (m.gate_proj.weight.detach().float().abs() ** p).sum(1).cpu()
        + (m.up_proj.weight.detach().float().abs() ** p).sum(1).cpu()
        + (m.down_proj.weight.detach().float().abs() ** p).sum(0).cpu()
        for m in mlps
    ]


def prune_mlp_(model: Model, fraction: float, importance: str = "activation", calib: Tensor | None = None) -> int:
    """Remove `fraction` of every layer's intermediate neurons (the least important); returns the
    new intermediate size."""
    _fraction(fraction, "MLP neurons")
    scores = neuron_scores(model, importance, calib)
    size = model.config.intermediate_size
    keep = size - round(fraction * size)
    if keep < 1:
        raise ValueError(f"removing {fraction:.0%} of {size} neurons leaves none")
    for layer, s in zip(model.module.model.layers, scores):
        kept = torch.topk(s, keep).indices.sort().values.to(layer.mlp.gate_proj.weight.device)
        mlp = layer.mlp
        mlp.gate_proj, mlp.up_proj = _shrunk(mlp.gate_proj, rows=kept), _shrunk(mlp.up_proj, rows=kept)
        mlp.down_proj = _shrunk(mlp.down_proj, cols=kept)
    _set_config(model, intermediate_size=keep)
    model.record("pruned", structure="mlp", importance=importance, fraction=fraction, intermediate_size=keep)
    return keep


@torch.no_grad()
def expert_scores(model: Model, importance: str = "frequency", calib: Tensor | None = None) -> dict[int, Tensor]:
    """One score per expert, for each decoder layer that is a mixture (by layer index)."""
    if importance == "frequency" and calib is None:
        raise ValueError("frequency importance needs calibration token ids (calib=...)")
    if importance not in EXPERT_IMPORTANCE:
        raise ValueError(f"unknown expert importance {importance!r}: choose one of {', '.join(EXPERT_IMPORTANCE)}")
    module = _module(model)
    mixtures = {i: layer.mlp for i, layer in enumerate(module.model.layers) if hasattr(layer.mlp, "experts")}
    if not mixtures:
        raise ValueError("the model has no mixture-of-experts layers")
    if importance == "l2":
        return {
            i: torch.stack([sum(p.detach().float().norm() ** 2 for p in e.parameters()) for e in m.experts]).cpu()
            for i, m in mixtures.items()
        }
    assert calib is not None
    mass = {i: torch.zeros(len(m.experts)) for i, m in mixtures.items()}

    def routed(i: int):  # the router's weights of the chosen experts, summed over tokens
        def hook(gate, args, logits):
            chosen, weights = mixtures[i].choose(logits.reshape(-1, logits.shape[-1]))
            mass[i].index_add_(0, chosen.flatten().cpu(), weights.flatten().float().cpu())

        return hook

    handles = [m.gate.register_forward_hook(routed(i)) for i, m in mixtures.items()]
    try:
        for start in range(0, calib.shape[0], 4):
            module(calib[start : start + 4].to(module.device))
    finally:
        for h in handles:
            h.remove()
    return mass


def prune_experts_(model: Model, fraction: float, importance: str = "frequency", calib: Tensor | None = None) -> int:
    """Remove `fraction` of every mixture layer's experts (the least important) and their router rows;
    returns the new number of experts."""
    _fraction(fraction, "experts")
    scores = expert_scores(model, importance, calib)
    count = model.config.num_experts
    keep = count - round(fraction * count)
    if keep < model.config.experts_per_token:
        raise ValueError(
            f"removing {fraction:.0%} of {count} experts leaves {keep}, fewer than the "
            f"{model.config.experts_per_token} each token is routed to"
        )
    for i, s in scores.items():
        moe = model.module.model.layers[i].mlp
        kept = torch.topk(s, keep).indices.sort().values
        moe.gate = _shrunk(moe.gate, rows=kept.to(moe.gate.weight.device))
        moe.experts = nn.ModuleList(moe.experts[int(e)] for e in kept)
    extra = model.config.extra
    _set_config(model, extra={**extra, **{k: keep for k in ("num_experts", "num_local_experts") if extra.get(k)}})
    model.record("pruned", structure="experts", importance=importance, fraction=fraction, num_experts=keep)
    return keep


def head_scores(model: Model, importance: str = "activation", calib: Tensor | None = None) -> list[Tensor]:
    """One score per query head, per decoder layer."""
    module = _scored_module(model, importance, HEAD_IMPORTANCE, "head", calib)
    attns = [layer.self_attn for layer in module.model.layers]
    heads, d = model.config.num_attention_heads, model.config.head_dim
    o_norms = [a.o_proj.weight.detach().float().reshape(-1, heads, d).pow(2).sum((0, 2)).sqrt().cpu() for a in attns]
    if importance == "activation":
        norms = _input_norms(module, [a.o_proj for a in attns], calib)
        return [n.reshape(heads, d).norm(dim=1) * o for n, o in zip(norms, o_norms)]
    return [
        a.q_proj.weight.detach().float().reshape(heads, d, -1).pow(2).sum((1, 2)).cpu() + o**2
        for a, o in zip(attns, o_norms)
    ]


def prune_heads_(
    model: Model,
    fraction: float,
    importance: str = "activation",
    calib: Tensor | None = None,
    whole_groups: bool = False,
) -> tuple[int, int]:
    """Remove about `fraction` of the attention heads of every layer: round(fraction × group size)
    query heads from each KV group, or (whole_groups) round(fraction × KV heads) KV groups with
    their query heads. Returns the new (query heads, KV heads)."""
    _fraction(fraction, "attention heads")
    cfg = model.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = heads // kv
    drop = round(fraction * (kv if whole_groups else group))
    if drop < 1:
        raise ValueError(
            f"{fraction:.0%} of {'KV groups' if whole_groups else 'each group'} "
            f"({kv if whole_groups else group}) rounds to no head: ask for more"
        )
    if drop >= (kv if whole_groups else group):
        raise ValueError(
            f"removing {drop} of {kv if whole_groups else group} "
            f"{'KV groups' if whole_groups else 'heads per group'} leaves none"
        )
    scores = head_scores(model, importance, calib)
    kept_per_layer = []
    for layer, s in zip(model.module.model.layers, scores):
        per_group = s.reshape(kv, group)
        if whole_groups:
            kept_groups = torch.topk(per_group.sum(1), kv - drop).indices.sort().values
            kept_heads = (kept_groups[:, None] * group + torch.arange(group)).reshape(-1)
        else:
            kept_groups = torch.arange(kv)
            within = torch.topk(per_group, group - drop, dim=1).indices.sort(dim=1).values
            kept_heads = (torch.arange(kv)[:, None] * group + within).reshape(-1)
        attn = layer.self_attn
        device = attn.q_proj.weight.device
        q_rows = (kept_heads[:, None] * d + torch.arange(d)).reshape(-1).to(device)
        kv_rows = (kept_groups[:, None] * d + torch.arange(d)).reshape(-1).to(device)
        attn.q_proj, attn.o_proj = _shrunk(attn.q_proj, rows=q_rows), _shrunk(attn.o_proj, cols=q_rows)
        attn.k_proj, attn.v_proj = _shrunk(attn.k_proj, rows=kv_rows), _shrunk(attn.v_proj, rows=kv_rows)
        attn.num_heads, attn.num_kv_heads = len(kept_heads), len(kept_groups)
        kept_per_layer.append(kept_heads.tolist())
    new_heads, new_kv = len(kept_heads), len(kept_groups)
    _set_config(model, num_attention_heads=new_heads, num_key_value_heads=new_kv)
    model.record(
        "pruned",
        structure="heads",
        importance=importance,
        fraction=fraction,
        whole_groups=whole_groups,
        num_attention_heads=new_heads,
        num_key_value_heads=new_kv,
        kept_heads=kept_per_layer,
    )
    return new_heads, new_kv


@torch.no_grad()
def block_influence(model: Model, calib: Tensor, batch_size: int = 4) -> Tensor:
    """ShortGPT's BI per decoder layer: 1 − mean over tokens of cos(layer input, layer output)."""
    module = model.module
    layers = module.model.layers
    sums, count = torch.zeros(len(layers), dtype=torch.float64), 0

    def hook(i):
        def fn(mod, args, out):
            x_in, x_out = args[0].float(), out[0].float()
            sums[i] += torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1).sum().double().cpu()

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, calib.shape[0], batch_size):
            ids = calib[start : start + batch_size]
            module(ids.to(module.device))
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return (1 - sums / count).float()


def drop_layers_(model: Model, count: int, calib: Tensor) -> list[int]:
    """Remove the `count` decoder layers with the lowest block influence; returns their indices."""
    n = model.config.num_hidden_layers
    if not 0 < count < n:
        raise ValueError(f"the number of layers to remove must be in [1, {n - 1}] for a {n}-layer model, got {count}")
    bi = block_influence(model, calib)
    dropped = sorted(torch.topk(-bi, count).indices.tolist())
    remove_layers_(model, dropped, block_influence=[round(float(b), 4) for b in bi])
    return dropped


def remove_layers_(model: Model, dropped: list[int], **record) -> None:
    """Remove the decoder layers at the indices `dropped` and record it (with `record`'s details)."""
    n = model.config.num_hidden_layers
    if any(not 0 <= i < n for i in dropped) or len(set(dropped)) >= n:
        raise ValueError(f"cannot remove layers {dropped} of a {n}-layer model (at least one must stay)")
    onload_all(model.module)  # a lazy model's layers are read by index: read them before the stack changes
    kept = [layer for i, layer in enumerate(model.module.model.layers) if i not in dropped]
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i  # the KV cache is indexed by position in the stack
    model.module.model.layers = nn.ModuleList(kept)
    _set_config(model, num_hidden_layers=len(kept))
    model.record("pruned", structure="layers", dropped=sorted(dropped), **record)


def prune_structured_(
    model: Model,
    spec: dict[str, float],
    importance: str = "activation",
    calib: Tensor | None = None,
    whole_groups: bool = False,
) -> dict:
    """Apply a `parse_structured` spec: MLP neurons, then heads, then layers; returns what changed."""
    changed: dict = {}
    if "mlp" in spec:
        changed["intermediate_size"] = prune_mlp_(model, spec["mlp"], importance, calib)
    if "experts" in spec:
        expert_importance = importance if importance in EXPERT_IMPORTANCE else "frequency"
        changed["num_experts"] = prune_experts_(model, spec["experts"], expert_importance, calib)
    if "heads" in spec:
        head_importance = importance if importance in HEAD_IMPORTANCE else "activation"
        changed["heads"] = prune_heads_(model, spec["heads"], head_importance, calib, whole_groups)
    if "layers" in spec:
        changed["dropped_layers"] = drop_layers_(model, int(spec["layers"]), calib)
    return changed
