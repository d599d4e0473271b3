"""GPTQ (AutoGPTQ, GPTQModel) and AWQ (AutoAWQ) checkpoints read into tuili's layers: the files are
written here by the formats' own packing rules, from codes tuili made, and must load back to the
same codes, scales and zero points (and, with act-order, the same product on permuted inputs)."""

import json

import pytest
import torch
from helpers import random_tiny
from safetensors.torch import load_file, save_file

import tuili
from tuili.quant import Int4WeightOnly, Int8WeightOnly, quantize_
from tuili.quant.gptq_awq_format import AWQ_ORDER
from tuili.quant.linear import WeightOnlyLinear

IDS = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))


def pack(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Codes into int32 words, 32/bits to a word, lowest bits first, along `dim` (AWQ: slot j holds
    the column order[j] of its group of eight)."""
    per = 32 // bits
    v = values.to(torch.int64)
    v = v.T if dim == 0 else v
    v = v.reshape(v.shape[0], -1, per)
    if order is not None:
        v = v[..., list(order)]
    words = sum(v[..., j] << (bits * j) for j in range(per))
    words = ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # the same bits, as int32
    return (words.T if dim == 0 else words).contiguous()


def fp16_scales(model):
    """The model with every quantized layer's scales rounded to fp16, as these files store them."""
    for m in model.module.modules():
        if isinstance(m, WeightOnlyLinear):
            m.scale = m.scale.half().float()
    return model


def rewrite(folder, method: str, bits: int, act_order: bool = False):
    """Turn tuili's saved compressed-tensors folder of a W{bits} model into `method`'s layout ("gptq":
    v1, zero points stored minus one; "gptq_v2"; "awq"), layer by layer, from the loaded layers' codes."""
    model = tuili.load(folder)
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if "weight_" not in k}
    orders = {}
    for name, m in model.module.named_modules():
        if not isinstance(m, WeightOnlyLinear):
            continue
        codes, scale = m.codes().T.to(torch.int64), m.scale.T.half().contiguous()  # (K, N), (G, N)
        if m.zero is None:  # symmetric codes q: stored as q + 2^(bits−1) with that zero point
            codes = codes + 2 ** (bits - 1)
            zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int64)
        else:
            zero = m.zero.T.to(torch.int64)
        k = codes.shape[0]
        g_idx = torch.arange(k, dtype=torch.int32) // m.group_size
        if act_order:  # input order[j] is stored where codes column j was, its group j // group size
            order = torch.randperm(k, generator=torch.Generator().manual_seed(len(orders)))
            codes = codes[torch.argsort(order)]
            g_idx = g_idx[torch.argsort(order)]
            orders[name] = order
        if method.startswith("gptq"):
            state[f"{name}.qweight"] = pack(codes, bits, 0)
            state[f"{name}.qzeros"] = pack(zero - int(method == "gptq"), bits, 1)  # v1 stores zero − 1
            state[f"{name}.g_idx"] = g_idx
        else:
            state[f"{name}.qweight"] = pack(codes, bits, 1, AWQ_ORDER)
            state[f"{name}.qzeros"] = pack(zero, bits, 1, AWQ_ORDER)
        state[f"{name}.scales"] = scale
    save_file(state, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": act_order, "sym": False}
        | ({"checkpoint_format": "gptq_v2"} if method == "gptq_v2" else {})
        if method.startswith("gptq")
        else {"quant_method": "awq", "bits": bits, "group_size": 32, "version": "gemm", "zero_point": True}
    )
    (folder / "config.json").write_text(json.dumps(config))
    return orders


@pytest.mark.parametrize(
    "method, bits, scheme",
    [
        ("gptq", 4, Int4WeightOnly(32)),
        ("gptq", 8, Int8WeightOnly(32)),
        ("gptq_v2", 4, Int4WeightOnly(32)),
        ("awq", 4, Int4WeightOnly(32)),
    ],
)
def test_a_checkpoint_loads_to_the_same_weights(tmp_path, method, bits, scheme):
    model = fp16_scales(quantize_(random_tiny("qwen2"), scheme, progress=False))  # q/k/v biases travel too
    model.save(tmp_path / "m")
    rewrite(tmp_path / "m", method, bits)
    loaded = tuili.load(tmp_path / "m")
    for (name, a), b in zip(model.module.named_modules(), loaded.module.modules()):
        if isinstance(a, WeightOnlyLinear):
            assert isinstance(b, WeightOnlyLinear) and b.bits == bits, name
            assert torch.equal(a.dequantize(), b.dequantize()) and torch.equal(a.scale, b.scale)
            if bits == 4:  # the very codes and zero points
                assert torch.equal(a.codes(), b.codes()) and torch.equal(a.zero, b.zero)
    with torch.no_grad():  # 8-bit: an asymmetric layout, computed by another path than tuili's symmetric int8
        torch.testing.assert_close(loaded.module(IDS).logits, model.module(IDS).logits, atol=1e-4, rtol=0)


def test_act_order_groups_are_regrouped_and_the_inputs_permuted(tmp_path):
    model = fp16_scales(quantize_(random_tiny(), Int4WeightOnly(32), progress=False))
    model.save(tmp_path / "m")
    orders = rewrite(tmp_path / "m", "gptq", 4, act_order=True)
    loaded = tuili.load(tmp_path / "m")
    layers = dict(loaded.module.named_modules())
    for name, a in model.module.named_modules():
        if name in orders:
            b, order = layers[name], orders[name]
            assert b.input_order is not None
            truth = torch.empty_like(a.dequantize())
            truth[:, order] = a.dequantize()  # input order[j] is weighted as a's column j
            torch.testing.assert_close(b.dequantize(), truth, atol=0, rtol=0)
            x = torch.randn(3, a.in_features)
            torch.testing.assert_close(b(x), a(x[:, order]), atol=1e-5, rtol=1e-5)
    with pytest.raises(tuili.ModelFormatError, match="act-order GPTQ codes"):
        loaded.save(tmp_path / "again")


def test_a_layer_missing_its_zero_points_is_named(tmp_path):
    model = fp16_scales(quantize_(random_tiny(), Int4WeightOnly(32), progress=False))
    model.save(tmp_path / "m")
    rewrite(tmp_path / "m", "gptq", 4)
    state = load_file(tmp_path / "m" / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.qzeros"]
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(tuili.ModelFormatError, match="lacks model.layers.1.mlp.up_proj.qzeros"):
        tuili.load(tmp_path / "m")
