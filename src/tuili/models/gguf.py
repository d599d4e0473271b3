"""Read a llama.cpp GGUF file: metadata -> LlamaConfig, tensors dequantized to float, tokenizer.

The `gguf` package (llama.cpp's own reader) parses the file and dequantizes every block type.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor

from tuili.errors import ModelFormatError
from tuili.models.config import LlamaConfig
from tuili.models.tokenizer import Tokenizer

_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3, split on load (tuili.models.families)
}
ARCH_NAMES = {"phi3": {"ffn_up": "mlp.gate_up_proj"}}  # Phi-3's ffn_up holds gate and up
_ROPE_FACTORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def read_gguf(path: Path) -> tuple[LlamaConfig, dict[str, Tensor], Tokenizer]:
    """Config, float32 state dict (HF names) and tokenizer of a GGUF checkpoint."""
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # the reader fails with ValueError, IndexError, struct errors ...
        raise ModelFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    config = _config(meta, path)
    tensor_names = {t.name for t in reader.tensors}
    config.tie_word_embeddings = "output.weight" not in tensor_names
    state, rope_factors = {}, {}
    for t in reader.tensors:
        if t.name in _ROPE_FACTORS:  # LongRoPE's factors, stored as tensors
            rope_factors[_ROPE_FACTORS[t.name]] = np.asarray(t.data, dtype=np.float32).tolist()
            continue
        name = _hf_name(t.name, path, ARCH_NAMES.get(config.model_type, {}))
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # unsupported or truncated block data
            raise ModelFormatError(f"{path}: cannot read tensor {t.name} ({e})") from e
        array = np.asarray(array, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
        state[name] = torch.from_numpy(array.copy())
    if rope_factors:
        config = _with_longrope(config, rope_factors, meta, path)
    if config.model_type == "llama":  # llama.cpp stores q and k rows interleaved for its RoPE
        _unpermute_qk(state, config)
    return config, state, Tokenizer.from_gguf(meta)


def _with_longrope(config: LlamaConfig, factors: dict[str, list[float]], meta: dict[str, Any], path: Path):
    arch = meta["general.architecture"]
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if len(factors) != 2 or original is None:
        raise ModelFormatError(f"{path}: LongRoPE needs both factor tensors and rope.scaling.original_context_length")
    scaling = {"rope_type": "longrope", **factors, "original_max_position_embeddings": int(original)}
    if meta.get(f"{arch}.rope.scaling.attn_factor") is not None:
        scaling["attention_factor"] = float(meta[f"{arch}.rope.scaling.attn_factor"])
    return LlamaConfig.from_hf({**config.to_hf(), "rope_scaling": scaling})


def _config(meta: dict[str, Any], path: Path) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise ModelFormatError(f"{path}: unsupported architecture {arch!r} (tuili reads {', '.join(sorted(_ARCHS))})")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling = None
    if key("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    return LlamaConfig(
        model_type=_ARCHS[arch],
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(key("context_length", 2048)),
        sliding_window=key("attention.sliding_window"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _hf_name(name: str, path: Path, arch_names: dict[str, str]) -> str:
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{kind}"
    match = _BLOCK.match(name)
    names = {**_PER_LAYER, **arch_names}
    if match and match.group(2) in names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{names[part]}.{kind}"
    raise ModelFormatError(f"{path}: tensor {name!r} has no place in a Llama-family model")


def _unpermute_qk(state: dict[str, Tensor], config: LlamaConfig) -> None:
    """Undo llama.cpp's convert permutation: rows (h, d/2, 2) -> the HF half-split layout (h, 2, d/2)."""
    for i in range(config.num_hidden_layers):
        for proj, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{proj}.{kind}"
                if name in state:
                    w = state[name]
                    state[name] = (
                        w.reshape(heads, config.head_dim // 2, 2, *w.shape[1:])
                        .transpose(1, 2)
                        .reshape(w.shape)
                        .contiguous()
                    )
