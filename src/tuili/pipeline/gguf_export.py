"""Export a model to GGUF, llama.cpp's format, with the `gguf` package's writer, as llama.cpp's
graph for its family (tuili.models.gguf_arch: names, keys, what the graph fixes and is refused).

Float weights are written as F16 (or F32); norms as F32. Quantized layers keep their codes where a
GGUF block type is the same format, with its scales rounded to fp16 (GGUF stores them so):
  int8 symmetric (W8A16, W8A8's weights)        -> Q8_0   w = d · q
  int4 symmetric                                -> Q4_0   w = d · (u − 8)
  int4 asymmetric (zero point or float minimum) -> Q4_1   w = d · u + m,  m = −scale · zero
Groups of 64, 128 ... and per-channel scales are re-blocked into GGUF's blocks of 32 (each block
takes its group's scale: the codes are unchanged). Other layouts (groups not a multiple of 32,
asymmetric int8) have no GGUF twin and are written dequantized, as F16; the result lists them.
llama.cpp stores query and key rows interleaved for its RoPE, so those rows are permuted as its
converter does (tuili's reader undoes it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from tuili.models.gguf_arch import ARCHS, EXPERT, GLOBAL, ROPE_FACTORS, ROPE_FREQS, GGUFArch
from tuili.models.io import atomic_file
from tuili.models.lazy import onload_all
from tuili.models.model import Model
from tuili.models.tokenizer import gguf_pre_name
from tuili.pipeline.export import ExportError, verify
from tuili.quant.linear import Int8Linear, WeightOnlyLinear

_BLOCK = 32
_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")
_ACTIVATION = {"gemma2": "gelu_pytorch_tanh", "gemma3": "gelu_pytorch_tanh"}  # llama.cpp's graphs; else SiLU


@dataclass
class GGUFExport:
    path: Path
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGUF type name -> tensors
    dequantized: list[str] = field(default_factory=list)  # quantized layers with no GGUF twin, written as F16
    max_abs_diff: float | None = None  # the file read back against tuili's logits (None: not checked)
    notes: list[str] = field(default_factory=list)  # what a llama.cpp user should know about the file


def _gguf_name(stored: str, arch: GGUFArch) -> str:
    """The GGUF name of a stored tensor name (an expert's: its layer's experts tensor)."""
    names = {hf: g for g, hf in arch.layer_names().items()}
    stem, _, kind = _EXPERT_INDEX.sub(f".experts.{EXPERT}.", stored).rpartition(".")
    globals_ = {hf: g for g, hf in GLOBAL.items()}
    if stem in globals_:
        return f"{globals_[stem]}.{kind}"
    parts = stem.split(".")  # model.layers.{i}.self_attn.q_proj
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in names:
        return f"blk.{parts[2]}.{names['.'.join(parts[3:])]}.{kind}"
    raise ExportError(f"tensor {stored!r} has no name in llama.cpp's {arch.name} graph")


def _rope_rows(name: str, rows: int, model: Model) -> Tensor | None:
    """The row order llama.cpp's converter gives q/k projections: (h, 2, d/2) -> (h, d/2, 2)."""
    if not ARCHS[model.config.model_type].permute_qk or not name.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        return None
    heads = model.config.num_attention_heads if name.endswith("q_proj") else model.config.num_key_value_heads
    d = model.config.head_dim
    return torch.arange(rows).reshape(heads, 2, d // 2).transpose(1, 2).reshape(-1)


def _fp16(t: Tensor) -> np.ndarray:
    return t.to(torch.float16).numpy().view(np.uint8).reshape(*t.shape, 2)


def _blocks(layer: nn.Module, rows: Tensor | None) -> tuple[np.ndarray, gguf.GGMLQuantizationType] | None:
    """The layer's codes as GGUF blocks, or None if its format has no GGUF twin. Groups of a
    multiple of 32 (or whole rows: per-channel scales, W8A8's weights) are re-blocked: every block
    of 32 takes its group's scale, so the codes stay and only the scales round to fp16."""
    if isinstance(layer, Int8Linear):
        codes, scale, zero, offset = layer.qweight, layer.weight_scale[:, None], None, None
        bits, symmetric, group = 8, True, layer.in_features
    elif isinstance(layer, WeightOnlyLinear) and layer.input_order is None:  # act-order groups: no twin
        codes, scale, zero, offset = layer.codes(), layer.scale, layer.zero, layer.offset
        bits, symmetric, group = layer.bits, layer.symmetric, layer.group_size
    else:
        return None
    k = layer.in_features
    if k % _BLOCK or bits not in (4, 8) or (bits == 8 and not symmetric) or (group % _BLOCK and group < k):
        return None
    per_group = group // _BLOCK if group < k else k // _BLOCK
    scale, zero, offset = (
        None if t is None else t.repeat_interleave(per_group, dim=1)[:, : k // _BLOCK] for t in (scale, zero, offset)
    )
    assert scale is not None
    if rows is not None:
        codes, scale = codes[rows], scale[rows]
        zero, offset = (None if t is None else t[rows] for t in (zero, offset))
    n = codes.shape[0]
    groups = codes.reshape(n, k // _BLOCK, _BLOCK)
    d = _fp16(scale)  # (n, g, 2)
    if bits == 8:
        qs = groups.to(torch.int8).numpy().view(np.uint8)
        return np.concatenate([d, qs], axis=-1).reshape(n, -1), gguf.GGMLQuantizationType.Q8_0
    u = (groups.to(torch.int16) + 8 if symmetric else groups.to(torch.int16)).to(torch.uint8)
    qs = (u[..., :16] | (u[..., 16:] << 4)).numpy()
    if symmetric:
        return np.concatenate([d, qs], axis=-1).reshape(n, -1), gguf.GGMLQuantizationType.Q4_0
    m = _fp16(-offset if offset is not None else -(scale * cast(Tensor, zero).float()))
    return np.concatenate([d, m, qs], axis=-1).reshape(n, -1), gguf.GGMLQuantizationType.Q4_1


def _add_linear(add, name: str, parts: list[tuple[str, nn.Module]], model: Model, float_dtype, result) -> None:
    """One GGUF tensor (and its bias) for one or more linear layers stored stacked by rows (Phi-3's
    qkv) or as a mixture's experts (experts × rows × columns): their GGUF blocks where all have the
    same block type, else their weights in float."""
    rows = [_rope_rows(hf_name, getattr(sub, "out_features", 0), model) for hf_name, sub in parts]
    join = np.stack if "_exps." in name else np.concatenate

    def stacked(tensors: list[Tensor]) -> np.ndarray:
        return join([(t if r is None else t[r]).numpy() for t, r in zip(tensors, rows)])

    blocks = [_blocks(sub, r) for (_, sub), r in zip(parts, rows)]
    kinds = {b[1] for b in blocks if b is not None}
    router = name.endswith("ffn_gate_inp.weight")  # llama.cpp's converter keeps routers in F32
    if None not in blocks and len(kinds) == 1 and not router:
        add(name, join([b[0] for b in blocks if b is not None]), kinds.pop())
    else:
        result.dequantized += [hf_name for hf_name, sub in parts if hasattr(sub, "qweight")]
        add(name, stacked([_float_weight(sub) for _, sub in parts]).astype(np.float32 if router else float_dtype))
    biases = [getattr(sub, "bias", None) for _, sub in parts]
    if all(isinstance(b, Tensor) for b in biases):
        add(name.removesuffix(".weight") + ".bias", stacked([b.detach().float() for b in biases]))


def _float_weight(module: nn.Module) -> Tensor:
    if hasattr(module, "dequantize"):
        return module.dequantize()
    return module.weight.detach().float()


def export_gguf(model: Model, path: str | Path, float_type: str = "f16", check: bool = True) -> GGUFExport:
    """Write `model` as a GGUF file at `path`, read back and checked first (`check`), atomically, and
    say which block types it used."""
    if float_type not in ("f16", "f32"):
        raise ExportError(f"float_type must be 'f16' or 'f32', got {float_type!r}")
    onload_all(model.module)
    arch = _arch(model.config)
    path = Path(path)
    if path.suffix != ".gguf":
        raise ExportError(f"the GGUF file's name must end in .gguf, got {path.name!r}")
    result = GGUFExport(path)
    with atomic_file(path, suffix=".gguf") as tmp:
        _write_gguf(gguf.GGUFWriter(tmp, arch.name), model, arch, float_type, result)
        if check:
            result.max_abs_diff = verify(check_gguf, tmp, model, "tuili's GGUF reader", half=True)  # fp16 block scales
    return result


def _arch(cfg) -> GGUFArch:
    """llama.cpp's graph for the model, or an ExportError saying what it would compute otherwise."""
    if cfg.model_type not in ARCHS:
        raise ExportError(f"GGUF export covers {', '.join(ARCHS)}, not {cfg.model_type!r}")
    arch = ARCHS[cfg.model_type]
    act = _ACTIVATION.get(arch.name, "silu")
    if cfg.mlp_bias:
        raise ExportError(f"the model's MLP has biases, which llama.cpp's {arch.name} graph does not take")
    if cfg.hidden_act != act:
        raise ExportError(
            f"the model's MLP computes {cfg.hidden_act}, and llama.cpp's {arch.name} graph computes {act}"
        )
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.sparse_layer(i)]
    if cfg.num_experts and dense:
        raise ExportError(
            f"layers {dense} of this mixture are dense MLPs (mlp_only_layers, decoder_sparse_step); llama.cpp's "
            f"{arch.name} graph has experts in every layer"
        )
    if cfg.num_experts and not cfg.norm_topk_prob:
        raise ExportError(f"norm_topk_prob is false, and llama.cpp's {arch.name} graph renormalizes the chosen experts")
    if arch.gemma:
        scalar = arch.query_scalar(cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.head_dim)
        if cfg.attention_scale != scalar**-0.5:
            raise ExportError(
                f"query_pre_attn_scalar={cfg.extra.get('query_pre_attn_scalar')}: llama.cpp's {arch.name} graph "
                f"scales queries by {scalar}^-1/2 at {cfg.num_hidden_layers} layers"
            )
    return arch


def _write_gguf(writer: gguf.GGUFWriter, model: Model, arch: GGUFArch, float_type: str, result: GGUFExport) -> None:
    """Write the model's metadata and tensors through `writer`, recording each tensor's type in `result`."""
    cfg = model.config
    try:
        _write_metadata(writer, model, arch, result)
        module = model.module
        float_dtype = np.float16 if float_type == "f16" else np.float32

        def add(name: str, array: np.ndarray, raw: gguf.GGMLQuantizationType | None = None) -> None:
            writer.add_tensor(name, array, raw_dtype=raw)
            kind = raw.name if raw is not None else ("F32" if array.dtype == np.float32 else "F16")
            result.tensor_types[kind] = result.tensor_types.get(kind, 0) + 1

        stored: dict[str, list[tuple[str, nn.Module]]] = {}  # layers stored as one (Phi-3's qkv_proj)
        head_codes = getattr(module.model.embed_tokens, "head", None)  # an embedding reading the head's codes
        for hf_name, sub in module.named_modules():
            if hf_name == "model.embed_tokens" and head_codes is not None:
                stored["token_embd.weight"] = [(hf_name, head_codes)]  # token_embd holds the codes; tied, no output
                continue
            has_weight = isinstance(getattr(sub, "weight", None), Tensor) or hasattr(sub, "qweight")
            if not hf_name or not has_weight or any(c for c in sub.children()):
                continue
            if hf_name == "lm_head" and cfg.tie_word_embeddings and (not hasattr(sub, "qweight") or head_codes):
                continue  # tied: llama.cpp reuses token_embd
            weight = getattr(sub, "weight", None)
            name = _gguf_name(f"{model.stored_name(hf_name)}.weight", arch)
            if isinstance(weight, Tensor) and weight.dim() == 1:  # norms stay F32 (Gemma's: 1 + w, as tuili holds)
                add(name, weight.detach().float().numpy())
                continue
            stored.setdefault(name, []).append((hf_name, sub))
        for name, parts in stored.items():
            _add_linear(add, name, parts, model, float_dtype, result)
        for tensor, key in ROPE_FACTORS.items():
            if cfg.rope_type == "longrope":
                add(tensor, np.asarray(cfg.rope_parameters[key], dtype=np.float32))
        if cfg.rope_type == "llama3":  # as llama.cpp's converter: each frequency's divisor
            add(ROPE_FREQS, _rope_divisors(model))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _rope_divisors(model: Model) -> np.ndarray:
    """f_i with θ_i = base^(−2i/d) / f_i: Llama 3's scaled frequencies as llama.cpp reads them."""
    cfg = model.config
    dim = cfg.rotary_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (base / model.module.rotary_emb.inv_freq).numpy().astype(np.float32)


def check_gguf(path: str | Path, model: Model, ids: Tensor) -> float:
    """Largest |logit difference| between `model` and the GGUF file read back by tuili's reader
    (llama.cpp's layout, its block types dequantized by the `gguf` package) on token ids (B, T)."""
    from tuili.models.loading import load

    written = load(str(path))
    with torch.no_grad():
        return float((written.module(ids).logits - model.module(ids).logits).abs().max())


def _context_length(cfg, arch: GGUFArch, result: GGUFExport) -> int:
    """The model's context, or its sliding window where llama.cpp's graph attends to every key (all
    but Gemma's): within the window both compute the same."""
    if not cfg.sliding_window or arch.gemma or cfg.sliding_window >= cfg.max_position_embeddings:
        return cfg.max_position_embeddings
    result.notes.append(
        f"llama.cpp's {arch.name} graph has no sliding window: the file's context length is the model's "
        f"window, {cfg.sliding_window} tokens (the model's own: {cfg.max_position_embeddings})"
    )
    return cfg.sliding_window


def _write_metadata(writer: gguf.GGUFWriter, model: Model, arch: GGUFArch, result: GGUFExport) -> None:
    cfg = model.config
    writer.add_name(Path(str(model.source)).stem)
    writer.add_context_length(_context_length(cfg, arch, result))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.rotary_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_parameters["factor"]))
    elif cfg.rope_type == "llama3" and arch.name == "llama":
        pass  # the divisors are a tensor (rope_freqs)
    elif cfg.rope_type == "longrope" and arch.name == "phi3":  # the factors are tensors (rope_factors_*)
        writer.add_rope_scaling_orig_ctx_len(int(cfg.rope_parameters["original_max_position_embeddings"]))
        writer.add_rope_scaling_attn_factors(model.module.rotary_emb.scaling)
    elif cfg.rope_type != "default":
        raise ExportError(f"rope scaling {cfg.rope_scaling} has no GGUF form tuili writes")
    if cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)
    _write_family(writer, cfg, arch)
    _write_tokenizer(writer, model)


def _write_family(writer: gguf.GGUFWriter, cfg, arch: GGUFArch) -> None:
    """The keys of llama.cpp's mixture and Gemma graphs."""
    if cfg.num_experts:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.experts_per_token)
        writer.add_expert_feed_forward_length(cfg.expert_intermediate_size)
    if arch.gemma:
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in cfg.layer_types])
        if cfg.attn_softcap is not None:
            writer.add_attn_logit_softcapping(cfg.attn_softcap)
        if cfg.final_softcap is not None:
            writer.add_final_logit_softcapping(cfg.final_softcap)
        if cfg.local_rope_theta is not None:
            writer.add_rope_freq_base_swa(cfg.local_rope_theta)


def _write_tokenizer(writer: gguf.GGUFWriter, model: Model) -> None:
    cfg = model.config
    tok = model.tokenizer
    backend = tok.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    merges = _merges(backend)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    for token, add in ((tok.bos_token, writer.add_bos_token_id), (tok.eos_token, writer.add_eos_token_id)):
        if token is not None and token in vocab:
            add(vocab[token])
    if cfg.pad_token_id is not None:
        writer.add_pad_token_id(cfg.pad_token_id)
    first = tok.encode("a")[:1]  # whether the tokenizer puts BOS in front of the text
    writer.add_add_bos_token(bool(first) and tok.bos_token is not None and first[0] == vocab.get(tok.bos_token))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _merges(backend) -> list[str]:
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export writes byte-level BPE tokenizers, not {model.get('type')!r}")
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


__all__ = ["GGUFExport", "check_gguf", "export_gguf"]
