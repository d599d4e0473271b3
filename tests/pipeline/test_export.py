"""ONNX export: the file runs in onnxruntime and gives tuili's logits, for float and quantized
models, at batch and sequence lengths other than the traced ones."""

import json

import pytest

from tests.helpers import random_tiny
from tuili.pipeline.export import check_onnx, export_onnx, sample_ids
from tuili.quant import Int4WeightOnly, Int8DynamicActivation, Int8WeightOnly, quantize_

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(
    "scheme",
    [None, Int4WeightOnly(group_size=32), Int8WeightOnly(), Int8DynamicActivation()],
    ids=["fp32", "w4a16", "w8a16", "w8a8"],
)
def test_onnx_export_matches_tuili_logits(tmp_path, scheme):
    model = random_tiny()
    if scheme is not None:
        quantize_(model, scheme, progress=False)
    path = export_onnx(model, tmp_path / "m.onnx").path
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind
    for batch, tokens in [(1, 5), (3, 29)]:  # dynamic batch and length
        assert check_onnx(path, model, sample_ids(model, batch, tokens)) < 1e-4


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
def test_a_model_with_a_smaller_kv_cache_exports_its_rounding_too(tmp_path, kv):
    from tuili.quant import quantize_kv_cache_

    model = random_tiny()
    quantize_kv_cache_(model, kv)  # the forward rounds keys and values: the graph must too
    path = export_onnx(model, tmp_path / "m.onnx").path
    assert check_onnx(path, model, sample_ids(model, 2, 11)) < 1e-4


def test_the_graph_takes_input_ids_and_gives_logits(tmp_path):
    model = random_tiny()
    runtime = ort.InferenceSession(
        str(export_onnx(model, tmp_path / "m.onnx").path), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in runtime.get_inputs()] == ["input_ids"]
    (logits,) = runtime.run(["logits"], {"input_ids": sample_ids(model, 2, 7).numpy()})
    assert logits.shape == (2, 7, model.config.vocab_size)


def test_a_recipe_exports_after_quantizing(tmp_path):
    from tuili.pipeline import optimize

    (tmp_path / "t.txt").write_text("some text to score and to calibrate on " * 40)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"stages:\n  - quantize: w8a16\n  - benchmark: {{max_tokens: 128, seq_len: 64}}\n"
        f"  - export: {tmp_path / 'q.onnx'}\n"
    )
    report = optimize(random_tiny(), recipe, data=str(tmp_path / "t.txt"), progress=False)
    (export,) = report.exports
    assert export["path"].endswith("q.onnx") and export["max_abs_diff"] < 1e-4
    assert "Exported to" in report.to_markdown() and json.dumps(report.to_dict())


def test_cli_export_writes_and_checks(tmp_path, capsys):
    from tuili.cli import main

    folder = tmp_path / "tiny"
    random_tiny().save(folder)
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "max abs diff" in out
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "m.bin")]) == 2
    assert "must name a .onnx or .gguf file" in capsys.readouterr().err


def test_export_stage_needs_an_onnx_path():
    from tuili.pipeline.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="line 2: export writes ONNX or GGUF"):
        parse_recipe("stages:\n  - export: model.bin\n", "r.yaml")
    with pytest.raises(RecipeError, match="line 3: quantize cannot come after export"):
        parse_recipe("stages:\n  - export: m.onnx\n  - quantize: w8a16\n", "r.yaml")


def real_width_model(seed: int = 0):
    """The default model's widths (hidden 576, MLP 1536, head_dim 64), two layers, a small vocabulary."""
    import dataclasses

    import torch

    from tests.helpers import tiny_config, tiny_tokenizer
    from tuili.models import LlamaForCausalLM, Model

    config = dataclasses.replace(
        tiny_config(),
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    )
    torch.manual_seed(seed)
    module = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05)
    return Model(module, tiny_tokenizer(), config, "random:real-width")


@pytest.mark.parametrize(
    "scheme",
    [
        Int4WeightOnly(group_size=32),
        Int4WeightOnly(group_size=128),
        Int4WeightOnly(group_size=128, symmetric=True),
        Int8WeightOnly(),
    ],
    ids=["w4a16-g32", "w4a16-g128-padded", "w4a16-g128-sym", "w8a16"],
)
def test_quantized_exports_are_valid_at_real_widths(tmp_path, scheme):
    """onnxruntime refused W4A16 graphs wider than 64 (a uint8 shift typed int16 by the exporter)."""
    model = quantize_(real_width_model(), scheme, progress=False)
    written = export_onnx(model, tmp_path / "m.onnx")
    assert written.max_abs_diff < 1e-3
    assert check_onnx(written.path, model, sample_ids(model, 1, 9)) < 1e-3


def test_an_export_that_fails_its_check_leaves_no_file_and_one_error_line(tmp_path, monkeypatch, capsys):
    from tuili.cli import main
    from tuili.pipeline import export
    from tuili.pipeline.export import ExportError

    model = random_tiny()
    monkeypatch.setattr(export, "check_onnx", lambda path, model, ids: 0.5)  # logits far off
    with pytest.raises(ExportError, match="differ from tuili's by 0.5"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []

    def unreadable(path, model, ids):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed:Type Error: uint8 vs int16\n  trace")

    monkeypatch.setattr(export, "check_onnx", unreadable)
    folder = model.save(tmp_path / "tiny")
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "out" / "m.onnx")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the exported file does not load in onnxruntime")
    assert "Traceback" not in err and err.rstrip().endswith("uint8 vs int16")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
