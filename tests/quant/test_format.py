"""Quantized models on disk (compressed-tensors): exact round trips, and transformers reads them."""

import json

import pytest
import torch
from helpers import random_tiny

import tuili
from tuili.quant import (
    GPTQ,
    Int4WeightInt8Activation,
    Int4WeightOnly,
    Int8DynamicActivation,
    Int8Linear,
    Int8StaticActivation,
    Int8WeightOnly,
    W4A8Linear,
    WeightOnlyLinear,
    quantize_,
)

pytestmark = pytest.mark.usefixtures("kernel_path")  # every test on both paths

CALIB = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(0))
SCHEMES = [
    Int4WeightOnly(group_size=32),
    Int4WeightOnly(group_size=64, symmetric=True),
    Int8WeightOnly(),
    Int4WeightInt8Activation(group_size=32),
    Int8WeightOnly(group_size=32),
    Int8DynamicActivation(),
    Int8StaticActivation(),
]


def outputs(model):
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(1))
    return model.module(ids).logits


@pytest.mark.parametrize("name", ["qwen2", "phi3"])  # q/k/v biases travel; Phi-3 stores q/k/v and gate/up fused
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: repr(s))
def test_save_load_round_trip_is_exact(tmp_path, scheme, name):
    model = random_tiny(name)
    quantize_(model, scheme, calib=CALIB)
    model.save(tmp_path / "q")
    again = tuili.load(tmp_path / "q")
    assert torch.equal(outputs(model), outputs(again))
    kinds = {type(m) for m in again.module.modules()} & {WeightOnlyLinear, W4A8Linear, Int8Linear}
    assert kinds == {type(m) for m in model.module.modules()} & {WeightOnlyLinear, W4A8Linear, Int8Linear}
    assert len(kinds) == 1
    assert (
        json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"]
        == "compressed-tensors"
    )


def test_mixed_precision_and_a_quantized_head_round_trip(tmp_path):
    model = random_tiny("llama-mqa-tied")
    quantize_(
        model,
        Int4WeightOnly(group_size=32),
        GPTQ(),
        calib=CALIB,
        ignore=[],
        overrides={"*down_proj": Int8WeightOnly(), "lm_head": Int8WeightOnly()},
    )
    model.save(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert len(config["quantization_config"]["config_groups"]) == 2
    assert config["tie_word_embeddings"] is False  # the head is stored apart from the embedding now
    again = tuili.load(tmp_path / "q")
    assert again.module.model.layers[0].mlp.down_proj.bits == 8
    assert torch.equal(outputs(model), outputs(again))


def test_saved_weights_are_packed(tmp_path):
    from safetensors import safe_open

    model = random_tiny()
    quantize_(model, Int4WeightOnly(group_size=32))
    model.save(tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
        assert packed.dtype == torch.int32 and packed.shape == (96, 64 * 4 // 32)
        assert "model.layers.0.mlp.up_proj.weight" not in f.keys()


@pytest.mark.parametrize("name", ["llama-gqa", "phi3"])
@pytest.mark.parametrize("scheme", [Int4WeightOnly(group_size=32, symmetric=True), Int8WeightOnly()], ids=repr)
def test_transformers_loads_a_tuili_quantized_folder(tmp_path, scheme, name):
    transformers = pytest.importorskip("transformers")
    model = random_tiny(name)
    quantize_(model, scheme)
    model.save(tmp_path / "q")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, outputs(model), atol=1e-4, rtol=0)


def test_unknown_quantization_method_is_refused(tmp_path):
    random_tiny().save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(tuili.ModelFormatError, match="'bitsandbytes' is not supported"):
        tuili.load(tmp_path / "m")


def test_missing_compressed_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model = random_tiny()
    quantize_(model, Int4WeightOnly(group_size=32))
    model.save(tmp_path / "q")
    state = load_file(tmp_path / "q" / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(state, tmp_path / "q" / "model.safetensors")
    with pytest.raises(tuili.ModelFormatError, match="lacks model.layers.1.self_attn.k_proj.weight_scale"):
        tuili.load(tmp_path / "q")


def test_a_tied_head_quantized_with_int8_activations_is_saved_apart(tmp_path):
    # its int8 weight is stored as "lm_head.weight": it must not be mistaken for the tied float copy
    model = random_tiny("llama-mqa-tied")
    quantize_(model, Int8DynamicActivation(), calib=CALIB, ignore=[])
    assert isinstance(model.module.lm_head, Int8Linear)
    model.save(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is False
    again = tuili.load(tmp_path / "q")
    assert isinstance(again.module.lm_head, Int8Linear)
    assert torch.equal(outputs(model), outputs(again))


def test_a_fused_family_is_stored_fused(tmp_path):
    from safetensors import safe_open

    model = random_tiny("phi3")
    quantize_(model, Int4WeightOnly(group_size=32, symmetric=True))
    model.save(tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.qkv_proj.weight_shape").tolist() == [64 + 2 * 32, 64]
        assert f.get_tensor("model.layers.0.mlp.gate_up_proj.weight_scale").shape == (2 * 96, 2)
    assert not any("q_proj" in k or "gate_proj" in k for k in keys)
    groups = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert any("qkv_proj" in t for g in groups.values() for t in g["targets"])


def test_layers_stored_together_must_be_quantized_alike(tmp_path):
    model = random_tiny("phi3")
    quantize_(model, Int4WeightOnly(group_size=32), overrides={"*q_proj": Int8WeightOnly()})
    with pytest.raises(tuili.ModelFormatError, match="stored as part of model.layers.0.self_attn.qkv_proj"):
        model.save(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_layers_stored_together_need_one_static_input_scale(tmp_path):
    model = random_tiny("phi3")
    quantize_(model, Int8StaticActivation(), calib=CALIB, progress=False)
    q_proj = model.module.model.layers[0].self_attn.q_proj
    q_proj.input_scale = q_proj.input_scale * 2  # q, k and v read one input: their scales agree unless changed
    with pytest.raises(tuili.ModelFormatError, match="qkv_proj.input_scale: the layers stored in it hold different"):
        model.save(tmp_path / "q")
