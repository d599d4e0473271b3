"""GPTQ and AWQ checkpoints (AutoGPTQ, GPTQModel, AutoAWQ; `quant_method` "gptq" or "awq") read
into tuili's weight-only layers, codes and scales as they are, never through float.

Per quantized linear layer (K inputs, N outputs, G groups) the files hold int32-packed codes:
  GPTQ  qweight (K·bits/32, N): input rows packed, 32/bits to an int32, lowest bits first
        qzeros  (G, N·bits/32): output columns packed alike; "gptq" (v1) stores zero − 1, "gptq_v2" zero
        scales  (G, N) fp16, g_idx (K,) the group of each input (act-order: not k // group_size)
  AWQ   qweight (K, N·bits/32), qzeros (G, N·bits/32): output columns packed in the order
        0 2 4 6 1 3 5 7 within each int32; scales (G, N) fp16
and W[n, k] = scale[g, n] · (q[k, n] − zero[g, n]), which is tuili's asymmetric layout with an
integer zero point. An act-order GPTQ layer (groups not in input order) keeps its codes with the
inputs regrouped, and permutes its activations to match (`WeightOnlyLinear.input_order`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tuili.errors import ModelFormatError
from tuili.models.formats import CheckpointFormat, StoredName, register
from tuili.models.selection import replace_module
from tuili.quant.linear import WeightOnlyLinear
from tuili.quant.primitives import pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output j of an int32's nibble slots, AutoAWQ's GEMM layout


def unpack(packed: Tensor, bits: int, dim: int) -> Tensor:
    """int32 words -> the `32 / bits` codes each holds, lowest bits first, laid out along `dim`."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    words = packed.to(torch.int32)
    if dim == 0:
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # (R, per, C)
        return codes.reshape(-1, words.shape[1])
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # (R, C, per)
    return codes.reshape(words.shape[0], -1) if per else codes


def _take(state: dict[str, Tensor], name: str, key: str) -> Tensor:
    if f"{name}.{key}" not in state:
        raise ModelFormatError(f"the checkpoint lacks {name}.{key}, which its quantization_config implies")
    return state.pop(f"{name}.{key}")


def _restore(name: str, linear: nn.Linear, state: dict[str, Tensor], qconfig: dict[str, Any]) -> WeightOnlyLinear:
    method, bits = qconfig["quant_method"], int(qconfig.get("bits") or qconfig.get("w_bit") or 4)
    if bits not in (4, 8):
        raise ModelFormatError(f"{name}: {bits}-bit {method} codes; tuili's layers hold 4 and 8 bits")
    k, n = linear.in_features, linear.out_features
    qweight, qzeros, scales = (_take(state, name, key) for key in ("qweight", "qzeros", "scales"))
    if method == "awq":
        order = torch.tensor(AWQ_ORDER if bits == 4 else (0, 1, 2, 3))
        inverse = torch.argsort(order)
        codes = unpack(qweight, bits, 1).view(k, -1, len(order))[..., inverse].reshape(k, -1)[:, :n]
        zeros = unpack(qzeros, bits, 1).view(qzeros.shape[0], -1, len(order))[..., inverse].reshape(qzeros.shape[0], -1)
        groups = torch.arange(k) // (k // scales.shape[0])
    else:
        codes = unpack(qweight, bits, 0)[:k]
        zeros = unpack(qzeros, bits, 1) + (0 if qconfig.get("checkpoint_format") == "gptq_v2" else 1)
        g_idx = state.pop(f"{name}.g_idx", None)
        group_size = int(qconfig.get("group_size") or -1)
        groups = g_idx.long() if g_idx is not None else torch.arange(k) // (group_size if group_size > 0 else k)
    zeros, scales = zeros[:, :n], scales.float()[:, :n]
    if codes.shape != (k, n) or scales.shape[0] != zeros.shape[0]:
        raise ModelFormatError(f"{name}: {method} tensors of shapes that do not fit a {k} → {n} layer")
    # regroup inputs so that each group's columns are contiguous (act-order stores them scattered)
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups, minlength=scales.shape[0])
    if counts.min() != counts.max() or counts[0] == 0:
        raise ModelFormatError(f"{name}: {method} groups of unequal sizes {counts.unique().tolist()}")
    group_size = int(counts[0])
    layer = WeightOnlyLinear(k, n, bits, group_size, False, linear.bias is not None)
    regrouped = codes[order].T.contiguous().to(torch.uint8)  # (N, K), groups contiguous
    layer.qweight = pack_int4(regrouped) if bits == 4 else regrouped
    layer.scale = scales.T.contiguous()
    layer.zero = zeros.T.contiguous().to(torch.uint8)
    if not torch.equal(order, torch.arange(k)):
        layer.input_order = order
    bias = state.pop(f"{name}.bias", None)
    if bias is not None:
        layer.bias = nn.Parameter(bias.float(), requires_grad=False)
    return layer


def load_gptq_awq(module: nn.Module, state: dict[str, Tensor], qconfig: dict[str, Any], stored: StoredName) -> None:
    """Replace every linear layer whose packed codes the checkpoint holds by a WeightOnlyLinear."""
    if qconfig["quant_method"] == "awq" and qconfig.get("version", "gemm").lower() != "gemm":
        raise ModelFormatError(f"AWQ version {qconfig.get('version')!r}: tuili reads AutoAWQ's GEMM layout")
    if qconfig["quant_method"] == "gptq" and qconfig.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        raise ModelFormatError(f"GPTQ checkpoint_format {qconfig.get('checkpoint_format')!r} is not one tuili reads")
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    for name, linear in linears.items():  # the state dict is in tuili's names already (models.families)
        if f"{name}.qweight" not in state:
            continue
        new = _restore(name, linear, state, qconfig)
        replace_module(module, name, new)
        state.update({f"{name}.{k}": v for k, v in new.state_dict().items()})


register("gptq", CheckpointFormat(load_gptq_awq))
register("awq", CheckpointFormat(load_gptq_awq))
