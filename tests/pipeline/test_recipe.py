"""Recipes: shipped ones load, bad ones are refused with the line and what to change, and the
stages of a recipe run in order, each on the model the previous one left."""

import dataclasses
import json

import pytest

from tests.helpers import random_tiny
from tuili.pipeline.recipe import KINDS, RecipeError, load_recipe, parse_recipe, shipped


def test_the_shipped_recipes_load_and_include_the_issues_examples():
    recipes = shipped()
    assert {"w8a16", "w4a16-gptq", "2:4+w8a8", "prune-mlp-25+distill+w4a16", "w8a8-smoothquant"} <= set(recipes)
    for name in recipes:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description and any(s.kind == "quantize" for s in recipe.stages)
    combined = load_recipe("prune-mlp-25+distill+w4a16")
    assert [s.kind for s in combined.stages] == ["analyze", "prune", "distill", "quantize", "benchmark"]
    assert combined.settings("prune") == {"spec": "mlp=0.25"} and combined.settings("distill") == {"steps": 60}


def test_yaml_and_toml_give_the_same_recipe():
    yaml_text = "name: r\nstages:\n  - analyze\n  - prune: 0.5\n  - quantize: {scheme: w4a16, group_size: 32}\n"
    toml_text = (
        'name = "r"\nstages = [\n  "analyze",\n  { prune = 0.5 },\n'
        '  { quantize = { scheme = "w4a16", group_size = 32 } },\n]\n'
    )
    a, b = parse_recipe(yaml_text, "r.yaml"), parse_recipe(toml_text, "r.toml", "toml")
    assert [(s.kind, s.settings) for s in a.stages] == [(s.kind, s.settings) for s in b.stages]
    assert a.settings("prune") == {"spec": "0.5"}  # a bare value is the stage's main setting
    assert [s.line for s in a.stages] == [3, 4, 5] and [s.line for s in b.stages] == [3, 4, 5]


BAD = [
    ("stages:\n  - analyze\n  - compiler\n", "r.yaml, line 3: unknown stage 'compiler'"),
    (
        "stages:\n  - quantize:\n      scheme: w4a16\n      group_size: many\n",
        "r.yaml, line 4: quantize.group_size must be a whole number, got 'many'",
    ),
    ("stages:\n  - quantize: {scheme: w4a16, bits: 3}\n", "r.yaml, line 2: quantize has no setting 'bits'"),
    ("stages:\n  - quantize: {method: gptq}\n", "r.yaml, line 2: quantize needs scheme"),
    (
        "stages:\n  - quantize: w4a16\n  - prune: mlp=0.25\n",
        "r.yaml, line 3: prune cannot come after quantize (line 2)",
    ),
    ("stages:\n  - save: out\n  - analyze\n", "r.yaml, line 3: analyze cannot come after save (line 2)"),
    ("stages:\n  - quantize: w8a16\n  - quantize: w4a16\n", "r.yaml, line 3: a second quantize stage"),
    ("stages:\n  - benchmark\n  - quantize: w8a16\n", "r.yaml, line 3: quantize cannot come after benchmark (line 2)"),
    ("stages:\n  - benchmark: {mode: fast}\n", "r.yaml, line 2: benchmark has no setting 'mode'"),
    ("stages:\n  - compile\n", "r.yaml, line 2: unknown stage 'compile'"),
    ("stages:\n  - quantize: w9a9\n", "r.yaml, line 2: quantize: unknown scheme 'w9a9'"),
    (
        "stages:\n  - quantize: {scheme: w8a16, kv_cache: fp8}\n",
        "r.yaml, line 2: quantize: unknown KV cache format 'fp8': choose one of float, bfloat16, int8",
    ),
    (
        "stages:\n  - quantize: {scheme: w8a8-dynamic, method: gptq}\n",
        "r.yaml, line 2: quantize: gptq quantizes weights only",
    ),
    ("stages:\n  - prune: {spec: '0.5', method: random}\n", "r.yaml, line 2: prune: unknown pruning method 'random'"),
    ("stages:\n  - prune: half\n", "r.yaml, line 2: prune: a pruning spec is a sparsity"),
    ("stages:\n  - distill: {steps: 10, lr: -1}\n", "r.yaml, line 2: distill:"),
    ("stages:\n  - analyze: 3\n", "r.yaml, line 2: analyze takes settings as a mapping"),
    ("stages:\n  - {quantize: w8a16, prune: 0.5}\n", "r.yaml, line 2: a stage is a name"),
    ("stages: []\n", "'stages' must be a non-empty list"),
    ("stages:\n  - benchmark: {batch_sizes: [1, 0]}\n", "r.yaml, line 2: benchmark.batch_sizes must be a list"),
    ("name: r\nstage:\n  - analyze\n", "unknown key(s) stage"),
    ("stages:\n  - quantize: {scheme: w4a16\n", "not valid YAML"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m.split(": ", 1)[-1][:40] for _, m in BAD])
def test_bad_recipes_are_refused_with_the_line_and_what_is_allowed(text, message):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "r.yaml")
    assert message in str(e.value)


def test_toml_errors_point_to_the_stage_line():
    text = 'name = "t"\nstages = [\n  "analyze",\n  { quantize = { scheme = "w9" } },\n]\n'
    with pytest.raises(RecipeError, match=r"t.toml, line 4: quantize: unknown scheme 'w9'"):
        parse_recipe(text, "t.toml", "toml")
    with pytest.raises(RecipeError, match="not valid TOML"):
        parse_recipe("stages = [", "t.toml", "toml")


def test_unknown_names_and_missing_files_say_what_exists(tmp_path):
    with pytest.raises(RecipeError, match="no recipe named 'nope'.*w8a16"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="no recipe file at"):
        load_recipe(tmp_path / "missing.yaml")


def test_every_stage_kind_is_documented_in_the_error_for_an_unknown_one():
    with pytest.raises(RecipeError) as e:
        parse_recipe("stages:\n  - train\n", "r.yaml")
    assert all(kind in str(e.value) for kind in KINDS)


def test_a_recipe_runs_its_stages_in_order_and_saves_the_result(tmp_path):
    import tuili
    from tuili.pipeline import optimize
    from tuili.quant.linear import quantized_layers

    (tmp_path / "t.txt").write_text("some text to score and to calibrate on " * 60)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: small\nstages:\n  - analyze: {{context_len: 64}}\n"
        f"  - prune: {{spec: mlp=0.5, calib_samples: 2, calib_len: 32}}\n"
        f"  - quantize: {{scheme: w8a16, kv_cache: bfloat16}}\n"
        f"  - benchmark: {{max_tokens: 256, seq_len: 64, batch_sizes: [1, 3]}}\n"
        f"  - save: {tmp_path / 'out'}\n"
    )
    model = random_tiny()
    width = model.config.intermediate_size
    report = optimize(model, recipe, data=str(tmp_path / "t.txt"), progress=False)
    assert [s.name for s in report.stages][:3] == ["baseline", "prune mlp=0.5", "quantize w8a16 rtn, bf16 KV cache"]
    assert len(report.stages) == 3
    assert report.stages[1].num_bytes < report.stages[0].num_bytes  # the quantize stage got the pruned model
    assert report.stages[2].num_bytes < report.stages[1].num_bytes
    assert report.stages[0].quality.num_tokens <= 256 and report.recipe == "small"
    saved = tuili.load(report.saved_to)
    assert saved.config.intermediate_size == width // 2 and quantized_layers(saved.module)
    assert saved.config.kv_cache_dtype == "bfloat16"
    assert "Recipe: small" in report.to_markdown() and json.dumps(report.to_dict())
    for stage in report.stages:  # every stage measured at every batch size, with its peak memory
        assert set(stage.speed.throughput) == {1, 3} and all(v > 0 for v in stage.speed.throughput.values())
        assert stage.speed.peak_memory_bytes is None or stage.speed.peak_memory_bytes > stage.num_bytes
    assert "3 concurrent, out tok/s" in report.to_markdown()


def test_cli_runs_a_recipe_and_refuses_it_beside_stage_flags(tmp_path, capsys):
    from tuili.cli import main

    folder = tmp_path / "tiny"
    random_tiny().save(folder)
    (tmp_path / "t.txt").write_text("some text to score and to calibrate on " * 60)
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "cli"\nstages = [{ quantize = "w8a16" }, { benchmark = { max_tokens = 128 } }]\n')
    common = [
        "optimize",
        "--model",
        str(folder),
        "--data",
        str(tmp_path / "t.txt"),
        "--seq-len",
        "64",
        "--report",
        str(tmp_path / "report"),
    ]
    assert main([*common, "--recipe", str(recipe), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recipe"] == "cli" and [s["name"] for s in out["stages"]] == ["baseline", "quantize w8a16 rtn"]
    assert main([*common, "--recipe", str(recipe), "--scheme", "w8a16"]) == 2
    assert "either --recipe or the stage flags" in capsys.readouterr().err
    assert main(["recipes"]) == 0
    assert "prune-mlp-25+distill+w4a16" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["w8a16", "w4a16-gptq", "prune-mlp-25+distill+w4a16"])
def test_the_shipped_recipes_quantize_to_files_transformers_loads(name, tmp_path):
    """The shipped weight-only recipes' quantize stage (its scheme, method, group size, head and
    their symmetric 4-bit default) on a tiny model: transformers loads the saved folder and agrees."""
    import torch
    import transformers

    stage = load_recipe(name).config("quantize")
    (tmp_path / "t.txt").write_text("some text to score and to calibrate on " * 60)
    stage = dataclasses.replace(stage, calib_samples=2, calib_len=32, kv_cache="float")
    model = random_tiny()
    stage.run(model, str(tmp_path / "t.txt"))
    folder = model.save(tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 259, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.module(ids).logits, atol=1e-3, rtol=0)


def test_asymmetric_4_bit_weights_are_a_choice_and_only_for_4_bit():
    recipe = parse_recipe("stages:\n  - quantize: {scheme: w4a16, symmetric: false}\n", "r.yaml")
    assert recipe.config("quantize").config().symmetric is False
    assert parse_recipe("stages:\n  - quantize: w4a16\n", "r.yaml").config("quantize").config().symmetric is True
    with pytest.raises(RecipeError, match="w8a16 has symmetric int8 weights"):
        parse_recipe("stages:\n  - quantize: {scheme: w8a16, symmetric: false}\n", "r.yaml")
