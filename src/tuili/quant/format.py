"""Quantized layers on disk in the compressed-tensors format (llm-compressor's; transformers and
vLLM load it): `pack-quantized` for weight-only layers, `int-quantized` for W8A8.

The `compressed-tensors` library packs the codes and describes the schemes, so the bits on disk
are exactly what its own compressors write. It is imported only when a quantized model is saved
or loaded (it pulls in transformers: seconds of start-up for every other command).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from tuili.errors import ModelFormatError
from tuili.models.formats import CheckpointFormat, StoredName, register
from tuili.models.selection import replace_module
from tuili.quant.linear import Int8Linear, QuantizedEmbedding, W4A8Linear, WeightOnlyLinear
from tuili.quant.primitives import pack_int4

QUANT_METHOD = "compressed-tensors"


def _scheme(m: nn.Module) -> tuple[str, dict[str, Any]]:
    """(format, QuantizationScheme fields) of one quantized layer."""
    if isinstance(m, WeightOnlyLinear):
        channel = m.group_size >= m.in_features
        weights = dict(
            num_bits=m.bits,
            type="int",
            symmetric=m.symmetric,
            strategy="channel" if channel else "group",
            group_size=None if channel else m.group_size,
        )
        if isinstance(m, W4A8Linear):
            acts = dict(num_bits=8, type="int", symmetric=True, strategy="group", group_size=m.group_size, dynamic=True)
            return "pack-quantized", {"weights": weights, "input_activations": acts}
        return "pack-quantized", {"weights": weights}
    weights = dict(num_bits=8, type="int", symmetric=True, strategy="channel")
    acts = (
        dict(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
        if m.static
        else dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    )
    return "int-quantized", {"weights": weights, "input_activations": acts}


def _offset(m: WeightOnlyLinear) -> int:
    """compressed-tensors keeps codes signed: unsigned codes (and zero points) shift by 2^(bits−1)."""
    return 0 if m.symmetric else 2 ** (m.bits - 1)


def compressed_config(module: nn.Module, stored: StoredName) -> dict[str, Any]:
    """The quantization_config of config.json for the module's quantized layers (read from the
    layers' schemes, not their tensors), naming the modules as the checkpoint stores them."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups: dict[str, tuple[str, dict, list[str]]] = {}
    for name, m in module.named_modules():
        if not isinstance(m, (WeightOnlyLinear, Int8Linear)):
            continue
        fmt, scheme = _scheme(m)
        key = repr((fmt, scheme))
        target = f"re:^{re.escape(stored(name))}$"
        taken = [g for g in groups.values() if target in g[2]]
        if taken and taken[0] is not groups.get(key):
            raise ModelFormatError(
                f"{name} is stored as part of {stored(name)}, whose other parts are quantized otherwise; "
                "quantize the layers stored together with one scheme"
            )
        if not taken:
            groups.setdefault(key, (fmt, scheme, []))[2].append(target)
    formats = {fmt for fmt, _, _ in groups.values()}
    config = QuantizationConfig(
        config_groups={
            f"group_{i}": QuantizationScheme(targets=targets, format=fmt, **scheme)
            for i, (fmt, scheme, targets) in enumerate(groups.values())
        },
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=list(dict.fromkeys(stored(n) for n, m in module.named_modules() if isinstance(m, nn.Linear))),
    )
    return config.model_dump(exclude_none=False)


def compressed_tensors(m: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """One quantized layer's tensors as compressed-tensors stores them (its bias apart), float ones in `dtype`."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if isinstance(m, WeightOnlyLinear):
        if m.input_order is not None:
            raise ModelFormatError(
                "the model holds act-order GPTQ codes (groups not in input order), which tuili saves only "
                "through GGUF export (dequantized) or after quantizing the float model again"
            )
        if m.offset is not None:
            raise ModelFormatError(
                "the model holds GGUF codes with float minimums per group (Q4_1, Q4_K), which compressed-tensors "
                "cannot store exactly: export it to GGUF (tuili export --gguf), or load the GGUF file without "
                "keep_quantized and quantize it"
            )
        codes = (m.codes().to(torch.int16) - _offset(m)).to(torch.int8)
        out = {
            "weight_packed": pack_to_int32(codes, m.bits),
            "weight_scale": m.scale.to(dtype).contiguous(),
            "weight_shape": torch.tensor([m.out_features, m.in_features]),
        }
        if m.zero is not None:
            zero = (m.zero.to(torch.int16) - _offset(m)).to(torch.int8)
            out["weight_zero_point"] = pack_to_int32(zero, m.bits, packed_dim=0)
        return out
    assert isinstance(m, Int8Linear)
    out = {"weight": m.qweight, "weight_scale": m.weight_scale[:, None].to(dtype).contiguous()}
    if m.input_scale is not None:
        out["input_scale"] = m.input_scale.reshape(1).to(dtype)
    return out


def load_compressed(module: nn.Module, state: dict[str, Tensor], qconfig: dict[str, Any], stored: StoredName) -> None:
    """Replace the layers that qconfig's groups target with tuili's quantized layers."""
    from compressed_tensors.quantization import QuantizationConfig

    try:
        config = QuantizationConfig.model_validate(qconfig)
    except ValueError as e:
        raise ModelFormatError(f"config.json: invalid compressed-tensors quantization_config ({e})") from e
    if config.quantization_status != "compressed":
        raise ModelFormatError(
            f"config.json: compressed-tensors status {config.quantization_status!r}; "
            "tuili reads compressed checkpoints only"
        )
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    for name, linear in linears.items():
        scheme = _match(stored(name), config)
        if scheme is None:
            continue
        new = _restore(name, linear, scheme, state)
        replace_module(module, name, new)
        state.update({f"{name}.{k}": v for k, v in new.state_dict().items()})


def _match(name: str, config):
    def hit(target: str) -> bool:
        return bool(re.match(target[3:], name)) if target.startswith("re:") else target in ("Linear", name)

    if any(hit(t) for t in config.ignore or []):
        return None
    return next((s for s in config.config_groups.values() if any(hit(t) for t in s.targets)), None)


def _restore(name: str, linear: nn.Linear, scheme, state: dict[str, Tensor]) -> nn.Module:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    def take(key: str) -> Tensor:
        if f"{name}.{key}" not in state:
            raise ModelFormatError(f"compressed-tensors checkpoint lacks {name}.{key}")
        return state.pop(f"{name}.{key}")

    w, acts = scheme.weights, scheme.input_activations
    bias = state.pop(f"{name}.bias", None)
    w4a8 = (
        acts is not None
        and w is not None
        and w.num_bits == 4
        and acts.num_bits == 8
        and acts.dynamic
        and acts.strategy == "group"
        and acts.group_size == w.group_size
    )
    if (acts is None or w4a8) and w is not None and w.type == "int":
        group_size = w.group_size if w.strategy == "group" else linear.in_features
        m: WeightOnlyLinear | Int8Linear
        m = (W4A8Linear if w4a8 else WeightOnlyLinear)(
            linear.in_features, linear.out_features, w.num_bits, group_size, w.symmetric, bias is not None
        )
        shape = torch.Size(take("weight_shape").tolist())
        codes = unpack_from_int32(take("weight_packed"), w.num_bits, shape).to(torch.int16) + _offset(m)
        m.scale = take("weight_scale").float().reshape(linear.out_features, -1).contiguous()
        if not w.symmetric:
            zero = unpack_from_int32(take("weight_zero_point"), w.num_bits, m.scale.shape, packed_dim=0)
            m.zero = (zero.to(torch.int16) + _offset(m)).to(torch.uint8)
        codes = codes.to(torch.int8 if w.symmetric else torch.uint8)
        m.qweight = pack_int4(codes) if w.num_bits == 4 else codes
    elif acts is not None and w is not None and w.num_bits == 8 and acts.num_bits == 8:
        m = Int8Linear(linear.in_features, linear.out_features, bias is not None, static=not acts.dynamic)
        m.qweight = take("weight").to(torch.int8)
        m.weight_scale = take("weight_scale").float().reshape(-1).contiguous()
        if m.static:
            m.input_scale = take("input_scale").float().reshape(())
    else:
        raise ModelFormatError(
            f"{name}: compressed-tensors scheme {scheme.model_dump()} is not one tuili runs "
            "(int weights, optionally with int8 activations)"
        )
    if bias is not None:
        m.bias = nn.Parameter(bias.float(), requires_grad=False)
    return m


def load_gguf_codes(module: nn.Module, state: dict[str, Tensor], qconfig: dict[str, Any], stored: StoredName) -> None:
    """GGUF blocks kept as codes (qconfig["layers"]: module name -> tuili.models.gguf.GGUFWeight)
    into WeightOnlyLinear layers; where the file ties the head to token_embd, the embedding reads
    the head's codes (QuantizedEmbedding)."""
    for name, w in qconfig["layers"].items():
        layer = WeightOnlyLinear.from_codes(w.codes, w.scale, w.offset, w.bits, w.group_size)
        bias = state.pop(f"{name}.bias", None)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(qconfig["dtype"]), requires_grad=False)
        replace_module(module, name, layer)
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    root: Any = module  # a LlamaForCausalLM, read by its parts' names
    if "lm_head" in qconfig["layers"] and root.config.tie_word_embeddings:
        root.model.embed_tokens = QuantizedEmbedding(root.lm_head, qconfig["dtype"])


register(QUANT_METHOD, CheckpointFormat(load_compressed, compressed_config, compressed_tensors))
register("gguf", CheckpointFormat(load_gguf_codes))  # read only: the layers are saved as compressed-tensors
