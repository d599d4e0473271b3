"""What a model family changes about how its checkpoint is stored, on top of the shared decoder.

tuili runs every family through one decoder (tuili.models.llama) with Hugging Face's Llama module
names. Where a family stores its layers otherwise, it says so here, once, and loading and saving
translate; the folder tuili writes is the family's own, so transformers and vLLM read it:
- fused layers: several of tuili's layers stacked by rows in one tensor (Phi-3's `qkv_proj`,
  `gate_up_proj`); quantized ones too: their codes, scales and zero points are split by rows;
- renamed modules: Gemma's norm after attention is `post_attention_layernorm`, the name Llama
  gives the norm before the MLP (Gemma's `pre_feedforward_layernorm`); Mixtral's experts are
  `block_sparse_moe.experts.{e}.w1/w2/w3`, tuili's `mlp.experts.{e}.gate_proj/down_proj/up_proj`;
- norm offsets: Gemma's RMSNorms multiply by (1 + w) and store w; tuili holds 1 + w (computed in
  fp32, as Gemma does), so one RMSNorm serves every family and SmoothQuant folds scales into it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tuili.errors import ModelFormatError
from tuili.models.config import LlamaConfig


@dataclass(frozen=True)
class Fused:
    """One stored layer that holds several of tuili's layers stacked by output rows."""

    name: str  # within a decoder layer: "self_attn.qkv_proj"
    parts: tuple[str, ...]  # tuili's layers, in the stored order: ("self_attn.q_proj", ...)
    rows: Callable[[LlamaConfig], tuple[int, ...]]  # each part's output rows


@dataclass(frozen=True)
class Family:
    """How a family's checkpoint differs from the Llama layout tuili computes with."""

    fused: tuple[Fused, ...] = ()
    renamed: dict[str, str] = field(default_factory=dict)  # parts of names inside a decoder layer: stored -> tuili
    norm_offset: float = 0.0  # an RMSNorm computes (offset + w): tuili holds offset + w

    @property
    def stored_names(self) -> dict[str, str]:
        """`renamed` the other way: tuili -> stored."""
        return {tuili: stored for stored, tuili in self.renamed.items()}


def _qkv_rows(c: LlamaConfig) -> tuple[int, ...]:
    return (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_key_value_heads * c.head_dim)


_GEMMA = Family(
    renamed={
        "post_attention_layernorm": "attn_output_norm",
        "pre_feedforward_layernorm": "post_attention_layernorm",
        "post_feedforward_layernorm": "mlp_output_norm",
    },
    norm_offset=1.0,
)
FAMILIES: dict[str, Family] = {
    "phi3": Family(
        fused=(
            Fused("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), _qkv_rows),
            Fused("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), lambda c: (c.intermediate_size,) * 2),
        )
    ),
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "mixtral": Family(renamed={"block_sparse_moe": "mlp", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}),
}
_PLAIN = Family()
_SHAPE = "weight_shape"  # compressed-tensors' (rows, columns) of a packed layer: rows add up
_PER_COLUMN = "g_idx"  # each input column's group (act-order): the same for every part
_NORM = "norm.weight"  # every RMSNorm's weight, and nothing else, ends so


def family(config: LlamaConfig) -> Family:
    return FAMILIES.get(config.model_type, _PLAIN)


def _fused_layers(config: LlamaConfig):
    """(stored prefix, tuili prefixes, rows) of every fused layer of every decoder layer."""
    for i in range(config.num_hidden_layers):
        for f in family(config).fused:
            yield f"model.layers.{i}.{f.name}", tuple(f"model.layers.{i}.{p}" for p in f.parts), f.rows(config)


def checkpoint_name(name: str, config: LlamaConfig) -> str:
    """The name under which a tuili module is stored (Phi-3's q_proj: its layer's qkv_proj)."""
    fam = family(config)
    for f in fam.fused:
        for part in f.parts:
            if name.endswith("." + part):
                return name[: -len(part)] + f.name
    return _renamed(name, fam.stored_names, key=False)


def _renamed(name: str, names: dict[str, str], key: bool = True) -> str:
    """model.layers.{i}.a.b... with each part inside the layer renamed; of a state dict `key`, not
    the last part (weight, bias, weight_scale ...)."""
    parts = name.split(".")
    if not names or len(parts) < 4 or parts[:2] != ["model", "layers"]:
        return name
    end = len(parts) - 1 if key else len(parts)
    return ".".join([*parts[:3], *(names.get(p, p) for p in parts[3:end]), *parts[end:]])


def to_tuili(state: dict[str, Tensor], config: LlamaConfig, source: str) -> dict[str, Tensor]:
    """A checkpoint's state dict as tuili's modules hold it: fused tensors split (rows in order),
    modules renamed, norm weights offset (in fp32)."""
    fam = family(config)
    state = {_renamed(k, fam.renamed): v for k, v in state.items()}
    for stored, parts, rows in _fused_layers(config):
        for key in [k for k in state if k.startswith(stored + ".")]:
            suffix = key[len(stored) :]
            pieces = _split(state.pop(key), rows, suffix, f"{source}: {key}")
            state.update({p + suffix: t for p, t in zip(parts, pieces)})
    if fam.norm_offset:
        state.update({k: v.float() + fam.norm_offset for k, v in state.items() if k.endswith(_NORM)})
    return state


def to_stored(state: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """tuili's state dict as the family stores it (the inverse of `to_tuili`)."""
    fam = family(config)
    if fam.norm_offset:
        state = {k: (v.float() - fam.norm_offset).to(v.dtype) if k.endswith(_NORM) else v for k, v in state.items()}
    state = {_renamed(k, fam.stored_names): v for k, v in state.items()}
    for stored, parts, _ in _fused_layers(config):
        suffixes = [{k[len(p) :] for k in state if k.startswith(p + ".")} for p in parts]
        if not any(suffixes):
            continue
        if any(s != suffixes[0] for s in suffixes):
            raise ModelFormatError(
                f"{', '.join(parts)} are stored as one layer ({stored}) and must be compressed alike; "
                f"they hold {[sorted(s) for s in suffixes]}"
            )
        for suffix in sorted(suffixes[0]):
            state[stored + suffix] = _stack([state.pop(p + suffix) for p in parts], suffix, stored)
    return state


def _split(t: Tensor, rows: tuple[int, ...], suffix: str, where: str) -> list[Tensor]:
    if suffix.endswith(_SHAPE):
        return [torch.tensor([r, *t.tolist()[1:]], dtype=t.dtype) for r in rows]
    if t.dim() == 0 or t.numel() == 1 or suffix.endswith(_PER_COLUMN):  # one for the whole layer
        return [t.clone() for _ in rows]
    total = sum(rows)
    per_row = total // t.shape[0] if t.shape[0] and total % t.shape[0] == 0 else 0  # packed rows (zero points)
    if not per_row or any(r % per_row for r in rows):
        raise ModelFormatError(f"{where}: {tuple(t.shape)} does not split into layers of {rows} rows")
    return [p.clone() for p in t.split([r // per_row for r in rows])]


def _stack(parts: list[Tensor], suffix: str, stored: str) -> Tensor:
    if suffix.endswith(_SHAPE):
        return torch.tensor([sum(int(p[0]) for p in parts), *parts[0].tolist()[1:]], dtype=parts[0].dtype)
    if suffix.endswith(_PER_COLUMN) or all(p.dim() == 0 or p.numel() == 1 for p in parts):
        if any(not torch.equal(p, parts[0]) for p in parts):
            raise ModelFormatError(
                f"{stored}{suffix}: the layers stored in it hold different values and the stored layer has "
                "one; quantize them alike (same calibration input)"
            )
        return parts[0]
    return torch.cat(parts)
