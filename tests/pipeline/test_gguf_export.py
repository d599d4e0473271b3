"""GGUF export: quantized layers keep their codes in the GGUF block type of the same format
(Q8_0, Q4_0, Q4_1), others are written dequantized and listed, and the file read back gives
tuili's logits (up to fp16 scales and F16 float weights)."""

import gguf
import numpy as np
import pytest
import torch

from tests.helpers import random_tiny
from tuili.cli import main
from tuili.models import load
from tuili.pipeline.export import ExportError
from tuili.pipeline.gguf_export import check_gguf, export_gguf
from tuili.quant import quantize_
from tuili.quant.config import Int4WeightOnly, Int8DynamicActivation, Int8WeightOnly

CASES = [
    (None, None),
    (Int4WeightOnly(32), "Q4_1"),
    (Int4WeightOnly(32, symmetric=True), "Q4_0"),
    (Int8WeightOnly(32), "Q8_0"),
    (Int8WeightOnly(), "Q8_0"),  # per channel: re-blocked
    (Int4WeightOnly(64, symmetric=True), "Q4_0"),
    (Int4WeightOnly(64), "Q4_1"),  # rows of 96: a group of 64, then one of 32
    (Int8DynamicActivation(), "Q8_0"),  # W8A8's int8 weights
]


@pytest.mark.parametrize(
    "name", ["llama-gqa", "llama-mqa-tied", "llama-rope-llama3", "qwen2", "mistral-sliding", "qwen3", "phi3-longrope"]
)
@pytest.mark.parametrize("scheme, block", CASES)
def test_gguf_round_trip_keeps_the_logits(tmp_path, name, scheme, block):
    model = random_tiny(name)
    if scheme is not None:
        quantize_(model, scheme, progress=False)
    result = export_gguf(model, tmp_path / "m.gguf", "f32")
    assert result.path.exists() and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary left
    linears = [n for n, m in model.module.named_modules() if hasattr(m, "qweight")]
    stored = {model.stored_name(n) for n in linears}  # Phi-3 stores q/k/v and gate/up as one tensor each
    assert len(stored) == (4 if name.startswith("phi3") else 7) * model.config.num_hidden_layers or scheme is None
    if block:
        assert result.tensor_types[block] == len(stored) and not result.dequantized
    ids = torch.randint(3, 200, (2, 12))
    # fp16 scales (and minimums) of the blocks; W8A8's activation rounding is not in the file (llama.cpp
    # rounds activations its own way, per block of 32)
    assert check_gguf(result.path, model, ids) < (5e-2 if isinstance(scheme, Int8DynamicActivation) else 5e-3)


def test_q4_1_blocks_are_the_codes_with_fp16_scale_and_minimum(tmp_path):
    model = quantize_(random_tiny(), Int4WeightOnly(32), progress=False)
    layer = model.module.model.layers[0].mlp.up_proj
    export_gguf(model, tmp_path / "m.gguf")
    tensor = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.ffn_up.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(layer.out_features, layer.in_features)
    scale = layer.scale.half().float()
    m = (-(layer.scale * layer.zero.float())).half().float()
    expected = layer.codes().float().view(layer.out_features, -1, 32) * scale[..., None] + m[..., None]
    np.testing.assert_allclose(got, expected.flatten(1).numpy(), rtol=1e-3, atol=1e-4)


def test_gguf_keeps_the_tokenizer_and_chat_template(tmp_path):
    model = random_tiny()
    export_gguf(model, tmp_path / "m.gguf")
    back = load(str(tmp_path / "m.gguf"))
    text = "a tokenizer 123 round trip"
    assert back.tokenizer.encode(text) == model.tokenizer.encode(text)
    assert back.tokenizer.chat_template == model.tokenizer.chat_template


def test_gguf_export_refuses_bad_paths_and_cli_checks(tmp_path, capsys):
    with pytest.raises(ExportError, match="must end in .gguf"):
        export_gguf(random_tiny(), tmp_path / "m.bin")
    with pytest.raises(ExportError, match="MLP has biases"):
        export_gguf(random_tiny("llama-mha-untied-bias"), tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="computes gelu, and llama.cpp's llama graph computes silu"):
        export_gguf(random_tiny("llama-gelu"), tmp_path / "m.gguf")
    folder = random_tiny().save(tmp_path / "tiny")
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "F16" in out and "the GGUF file read back vs tuili's" in out and "max abs diff" in out


def test_a_layout_without_a_gguf_twin_is_written_as_float_and_listed(tmp_path):
    from tuili.quant.linear import WeightOnlyLinear

    model = random_tiny()
    mlp = model.module.model.layers[0].mlp
    mlp.up_proj = WeightOnlyLinear.from_float(mlp.up_proj, 8, 32, symmetric=False)  # GGUF has no asymmetric int8
    result = export_gguf(model, tmp_path / "m.gguf", "f32")
    assert result.dequantized == ["model.layers.0.mlp.up_proj"]
    assert check_gguf(result.path, model, torch.randint(3, 200, (1, 12))) < 1e-4


@pytest.mark.parametrize(("name", "window"), [("mistral-sliding", 8), ("gemma3", None)])
def test_context_length_is_the_window_where_llama_cpp_attends_to_every_key(tmp_path, name, window):
    model = random_tiny(name, query_pre_attn_scalar=16) if name == "gemma3" else random_tiny(name)
    written = export_gguf(model, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(written.path)
    arch = reader.fields["general.architecture"].contents()
    context = reader.fields[f"{arch}.context_length"].contents()
    assert context == (window or model.config.max_position_embeddings)  # Gemma's graph slides: its own
    assert bool(written.notes) == bool(window)
    assert load(written.path).config.sliding_window == model.config.sliding_window
