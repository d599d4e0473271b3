"""Read a llama.cpp GGUF file: metadata -> LlamaConfig, tensors, tokenizer.

The `gguf` package (llama.cpp's own reader) parses the file and dequantizes every block type. With
`keep_quantized`, the linear layers stored in a block type that tuili's quantized layers hold
exactly stay as their integer codes and per-group scales (`GGUFWeight`), never going through float:
  Q4_0  w = d·(u − 8)              4-bit symmetric, groups of 32
  Q4_1  w = d·u + m                4-bit, groups of 32, a float minimum per group
  Q4_K  w = d·s_j·u − dmin·m_j     4-bit, groups of 32 (the super-block's 6-bit scales folded in)
  Q5_0  w = d·(u − 16)             8-bit symmetric, groups of 32 (codes in −16 … 15)
  Q8_0  w = d·q                    8-bit symmetric, groups of 32
  Q6_K  w = d·s_j·(u − 32)         8-bit symmetric, groups of 16
Other types (Q5_1, Q5_K, Q2_K, Q3_K, the IQ types) are dequantized to float and listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor

from tuili.errors import ModelFormatError
from tuili.models.config import GEMMA_PATTERN, LlamaConfig
from tuili.models.families import checkpoint_name, family, to_tuili
from tuili.models.gguf_arch import (
    ARCHS,
    EXPERT,
    GLOBAL,
    ROPE_FACTORS,
    ROPE_FREQS,
    GGUFArch,
    gguf_archs,
    model_type,
)
from tuili.models.tokenizer import Tokenizer

_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass
class GGUFWeight:
    """A linear layer's weight as a GGUF file stores it: W = scale · codes − offset per group."""

    codes: Tensor  # (out, in) int8 (symmetric) or uint8
    scale: Tensor  # (out, groups) fp32
    offset: Tensor | None  # (out, groups) fp32; None: symmetric (W = scale · codes)
    bits: int
    group_size: int
    block_type: str  # the GGUF type it came from
    experts: int = 1  # a mixture's experts, stacked by rows (split by the reader)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.bits // 8 + self.scale.numel() * (2 if self.offset is None else 4)


def read_gguf(
    path: Path, keep_quantized: bool = False
) -> tuple[LlamaConfig, dict[str, Tensor], Tokenizer, dict[str, GGUFWeight]]:
    """Config, state dict (the family's stored names, float32) and tokenizer of a GGUF checkpoint;
    with `keep_quantized`, also the linear weights kept as codes (by stored module name: "lm_head"
    for a tied token_embd), which the state dict then lacks."""
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # the reader fails with ValueError, IndexError, struct errors ...
        raise ModelFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    tensor_names = {t.name for t in reader.tensors}
    config = _config(meta, path, tied="output.weight" not in tensor_names)
    arch = ARCHS[config.model_type]
    state, rope_factors, packed = {}, {}, {}
    for t in reader.tensors:
        if t.name in ROPE_FACTORS or t.name == ROPE_FREQS:  # RoPE factors, stored as tensors
            rope_factors[ROPE_FACTORS.get(t.name, "freqs")] = np.asarray(t.data, dtype=np.float32).tolist()
            continue
        name = _hf_name(t.name, path, arch)
        kept = _codes(t) if keep_quantized and len(t.shape) in (2, 3) and name.endswith(".weight") else None
        if kept is not None and (name != "model.embed_tokens.weight" or config.tie_word_embeddings):
            module = "lm_head" if name == "model.embed_tokens.weight" else name.removesuffix(".weight")
            packed.update(_per_expert(module, kept))  # a tied token_embd: the head's codes, which the embedding reads
            continue
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # unsupported or truncated block data
            raise ModelFormatError(f"{path}: cannot read tensor {t.name} ({e})") from e
        array = np.asarray(array, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
        state.update(_per_expert(name, torch.from_numpy(array.copy())))
    offset = family(config).norm_offset  # llama.cpp's files hold norms as tuili does (Gemma: 1 + w)
    if offset:  # the stored checkpoint, which `to_tuili` reads, holds w
        state.update({k: v - offset for k, v in state.items() if k.endswith("norm.weight")})
    if rope_factors:
        config = _with_longrope(config, rope_factors, meta, path)
    if arch.permute_qk:  # llama.cpp stores q and k rows interleaved for its RoPE
        _unpermute_qk(state, config, packed)
    return config, state, Tokenizer.from_gguf(meta, path), packed


def codes_to_tuili(packed: dict[str, GGUFWeight], config: LlamaConfig, source: str) -> dict[str, GGUFWeight]:
    """Kept layers under tuili's module names: a fused layer's codes split by rows (Phi-3), renamed
    modules renamed (Mixtral's experts), through the same translation as the float weights."""
    parts = {"codes": lambda w: w.codes, "scale": lambda w: w.scale, "offset": lambda w: w.offset}
    flat = {f"{n}.{p}": get(w) for n, w in packed.items() for p, get in parts.items() if get(w) is not None}
    flat = to_tuili(flat, config, source)
    out = {}
    for module in sorted({k.rpartition(".")[0] for k in flat}):
        w = packed[checkpoint_name(module, config)]
        out[module] = GGUFWeight(
            flat[f"{module}.codes"],
            flat[f"{module}.scale"],
            flat.get(f"{module}.offset"),
            w.bits,
            w.group_size,
            w.block_type,
        )
    return out


def _per_expert(name: str, t):
    """One entry per expert of a 3-D experts tensor (its stored name holds EXPERT), else `name: t`."""
    if EXPERT not in name:
        return {name: t}
    if isinstance(t, GGUFWeight):
        n = t.codes.shape[0] // t.experts
        rows = lambda a, e: None if a is None else a[e * n : (e + 1) * n].clone()  # noqa: E731
        return {
            name.replace(EXPERT, str(e)): GGUFWeight(
                rows(t.codes, e), rows(t.scale, e), rows(t.offset, e), t.bits, t.group_size, t.block_type
            )
            for e in range(t.experts)
        }
    return {name.replace(EXPERT, str(e)): w.clone() for e, w in enumerate(t)}


def _codes(t) -> GGUFWeight | None:
    """A quantized tensor's codes and scales where a tuili layer holds its block type exactly."""
    kind = t.tensor_type.name
    if kind not in _CODES:
        return None
    *lead, rows, cols = (int(n) for n in reversed(t.shape))
    experts = lead[0] if lead else 1
    rows *= experts  # a mixture's experts one after another
    blocks = np.asarray(t.data).reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
    codes, scale, offset, bits, group = _CODES[kind](blocks)
    as_tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).reshape(rows, -1)  # noqa: E731
    return GGUFWeight(as_tensor(codes), as_tensor(scale), as_tensor(offset), bits, group, kind, experts)


def _f16(a: np.ndarray) -> np.ndarray:
    return a.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16·k) bytes -> (n, 32·k) codes: low nibbles then high nibbles of each 16 bytes."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _q4_0(b):
    return (_nibbles(b[:, 2:]).astype(np.int8) - 8), _f16(b[:, :2]), None, 4, 32


def _q4_1(b):
    return _nibbles(b[:, 4:]), _f16(b[:, :2]), -_f16(b[:, 2:4]), 4, 32


def _q8_0(b):
    return b[:, 2:].view(np.int8), _f16(b[:, :2]), None, 8, 32


def _q5_0(b):
    qh = b[:, 2:6].copy().view(np.uint32)[:, 0]  # bit j: the fifth bit of code j
    high = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    return ((_nibbles(b[:, 6:]) | high).astype(np.int8) - 16), _f16(b[:, :2]), None, 8, 32


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16])
    q = b[:, 16:].reshape(n, -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1), d * sc.astype(np.float32), dmin * m.astype(np.float32), 4, 32


def _q6_k(b):
    n = b.shape[0]
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b[:, 208:210])
    low = ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    low = (low & 0x0F).reshape(n, -1, 32)
    high = qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (high & 0x03).reshape(n, -1, 32)
    return ((low | (high << 4)).astype(np.int8) - 32).reshape(n, -1), d * sc.astype(np.float32), None, 8, 16


_CODES = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q6_K": _q6_k}


def _with_longrope(config: LlamaConfig, factors: dict[str, list[float]], meta: dict[str, Any], path: Path):
    """The RoPE of factor tensors: Phi-3's LongRoPE, or llama's per-frequency divisors (what
    llama.cpp's converter writes for Llama 3's scaling), which is LongRoPE with one set of factors
    for every length and no attention factor: the same frequencies, θ_i / f_i."""
    arch = meta["general.architecture"]
    if "freqs" in factors:
        f = factors.pop("freqs")
        if factors:
            raise ModelFormatError(f"{path}: both rope_freqs and LongRoPE factor tensors; a model has one RoPE")
        scaling = {
            "rope_type": "longrope",
            "short_factor": f,
            "long_factor": f,
            "original_max_position_embeddings": config.max_position_embeddings,
            "attention_factor": 1.0,
        }
        return LlamaConfig.from_hf({**config.to_hf(), "rope_scaling": scaling})
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if len(factors) != 2 or original is None:
        raise ModelFormatError(f"{path}: LongRoPE needs both factor tensors and rope.scaling.original_context_length")
    scaling = {"rope_type": "longrope", **factors, "original_max_position_embeddings": int(original)}
    if meta.get(f"{arch}.rope.scaling.attn_factor") is not None:
        scaling["attention_factor"] = float(meta[f"{arch}.rope.scaling.attn_factor"])
    return LlamaConfig.from_hf({**config.to_hf(), "rope_scaling": scaling})


def _config(meta: dict[str, Any], path: Path, tied: bool) -> LlamaConfig:
    arch = meta.get("general.architecture")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    experts = int(key("expert_count") or 0)
    kind = model_type(str(arch), experts, bool(key("attention.sliding_window")))
    if kind is None:
        raise ModelFormatError(f"{path}: unsupported architecture {arch!r} (tuili reads {', '.join(gguf_archs())})")
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    layers = int(key("block_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotated = int(key("rope.dimension_count", head_dim))  # fewer: partial rotary (Phi-4-mini)
    hf: dict[str, Any] = dict(
        model_type=kind,
        vocab_size=int(key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 2048)),
        sliding_window=key("attention.sliding_window"),
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    if key("rope.scaling.type") == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if rotated != head_dim:
        hf["partial_rotary_factor"] = rotated / head_dim
    if hf["sliding_window"] and kind in ("qwen2", "qwen3", "qwen3_moe"):
        hf["use_sliding_window"] = True
    if experts:
        hf["num_local_experts" if kind == "mixtral" else "num_experts"] = experts
        hf["num_experts_per_tok"] = int(key("expert_used_count"))
        hf["moe_intermediate_size"] = int(key("expert_feed_forward_length") or hf["intermediate_size"])
        hf["norm_topk_prob"] = True  # llama.cpp's mixture graphs renormalize the chosen experts' weights
    if ARCHS[kind].gemma:
        hf.update(_gemma_keys(key, kind, ARCHS[kind].query_scalar(hidden, heads, layers, head_dim)))
    return LlamaConfig.from_hf(hf)


def _gemma_keys(key, kind: str, scalar: int) -> dict[str, Any]:
    """Gemma's config keys from llama.cpp's: soft caps, the local RoPE base, which layers slide."""
    layers = int(key("block_count"))
    pattern = key("attention.sliding_window_pattern", GEMMA_PATTERN[kind])
    sliding = (
        [bool(p) for p in pattern]
        if isinstance(pattern, list)
        else [(i + 1) % int(pattern) != 0 for i in range(layers)]
    )
    out = {
        "query_pre_attn_scalar": scalar,
        "attn_logit_softcapping": key("attn_logit_softcapping"),
        "final_logit_softcapping": key("final_logit_softcapping"),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
    }
    if kind == "gemma3_text":
        out["rope_local_base_freq"] = float(key("rope.freq_base_swa", 10000.0))
    return out


def _hf_name(name: str, path: Path, arch: GGUFArch) -> str:
    stem, _, kind = name.rpartition(".")
    if stem in GLOBAL:
        return f"{GLOBAL[stem]}.{kind}"
    match = _BLOCK.match(name)
    names = arch.layer_names()
    if match and match.group(2) in names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{names[part]}.{kind}"
    raise ModelFormatError(f"{path}: tensor {name!r} has no place in a {arch.name} model")


def _unpermute_qk(state: dict[str, Tensor], config: LlamaConfig, packed: dict[str, GGUFWeight]) -> None:
    """Undo llama.cpp's convert permutation: rows (h, d/2, 2) -> the HF half-split layout (h, 2, d/2)."""

    def unpermute(w: Tensor, heads: int) -> Tensor:
        return w.reshape(heads, config.head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()

    for i in range(config.num_hidden_layers):
        for proj, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
            name = f"model.layers.{i}.self_attn.{proj}"
            for kind in ("weight", "bias"):
                if f"{name}.{kind}" in state:
                    state[f"{name}.{kind}"] = unpermute(state[f"{name}.{kind}"], heads)
            if name in packed:  # rows of codes, scales and offsets move together
                p = packed[name]
                p.codes, p.scale = unpermute(p.codes, heads), unpermute(p.scale, heads)
                p.offset = None if p.offset is None else unpermute(p.offset, heads)
