"""ONNX export: the file runs in onnxruntime and gives tuili's logits, for float and quantized
models, at batch and sequence lengths other than the traced ones."""

import json

import pytest

from tests.helpers import random_tiny
from tuili.pipeline.export import check_onnx, export_onnx, sample_ids
from tuili.quant import Int4WeightOnly, Int8DynamicActivation, Int8WeightOnly, quantize_

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("scheme", [None, Int4WeightOnly(group_size=32), Int8WeightOnly(), Int8DynamicActivation()],
                         ids=["fp32", "w4a16", "w8a16", "w8a8"])
def test_onnx_export_matches_tuili_logits(tmp_path, scheme):
    model = random_tiny()
    if scheme is not None:
        quantize_(model, scheme, progress=False)
    path = export_onnx(model, tmp_path / "m.onnx")
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind
    for batch, tokens in [(1, 5), (3, 29)]:  # dynamic batch and length
        assert check_onnx(path, model, sample_ids(model, batch, tokens)) < 1e-4


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
def test_a_model_with_a_smaller_kv_cache_exports_its_rounding_too(tmp_path, kv):
    from tuili.quant import quantize_kv_cache_

    model = random_tiny()
    quantize_kv_cache_(model, kv)  # the forward rounds keys and values: the graph must too
    path = export_onnx(model, tmp_path / "m.onnx")
    assert check_onnx(path, model, sample_ids(model, 2, 11)) < 1e-4


def test_the_graph_takes_input_ids_and_gives_logits(tmp_path):
    model = random_tiny()
    session = ort.InferenceSession(str(export_onnx(model, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    (logits,) = session.run(["logits"], {"input_ids": sample_ids(model, 2, 7).numpy()})
    assert logits.shape == (2, 7, model.config.vocab_size)


def test_a_recipe_exports_after_quantizing(tmp_path):
    from tuili.pipeline import optimize

    (tmp_path / "t.txt").write_text("some text to score and to calibrate on " * 40)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - quantize: w8a16\n  - benchmark: {{max_tokens: 128, seq_len: 64}}\n"
                      f"  - export: {tmp_path / 'q.onnx'}\n")
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
