"""The command line on a tiny saved model: every command runs and bad input exits 2 with a message."""

import contextlib
import json

import pytest
from helpers import random_tiny

from tuili.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    random_tiny().save(path)
    return str(path)


def test_analyze_json(folder, capsys):
    assert main(["analyze", "--model", folder, "--json", "--context-len", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["context_len"] == 64 and out["num_parameters"] > 0


def test_eval_json(folder, capsys, tmp_path):
    (tmp_path / "t.txt").write_text("some text to score " * 40)
    assert main(["eval", "--model", folder, "--data", str(tmp_path / "t.txt"), "--seq-len", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_windows"] >= 1 and out["perplexity"] > 1


def test_generate_streams_text(folder, capsys):
    assert main(["generate", "hi", "--model", folder, "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_chat_reads_turns_until_eof(folder, capsys, monkeypatch):
    turns = iter(["hello", "again"])

    def fake_input(prompt):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--model", folder, "--max-tokens", "3", "--system", "be brief"]) == 0


def test_optimize_writes_its_report(folder, capsys, tmp_path):
    (tmp_path / "t.txt").write_text("text for the report " * 200)
    report = tmp_path / "report"
    assert (
        main(
            [
                "optimize",
                "--model",
                folder,
                "--data",
                str(tmp_path / "t.txt"),
                "--seq-len",
                "64",
                "--report",
                str(report),
                "--scheme",
                "w8a8-dynamic",
                "--method",
                "smoothquant",
                "--calib-samples",
                "4",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    out = captured.out
    assert "## Analysis" in out and "## Stages" in out and (report / "report.md").read_text() in out + "\n"
    assert "| baseline" in out and "| quantize w8a8-dynamic smoothquant" in out
    assert f"report: {report / 'report.html'}" in captured.err
    page = (report / "report.html").read_text()
    assert page.count('<img class="plot"') == 3 and "quantize w8a8-dynamic smoothquant" in page


def test_missing_model_exits_2_with_a_message(capsys, tmp_path):
    assert main(["analyze", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "\nerror: " in err and "nope" in err and "Traceback" not in err


def test_bad_data_exits_2(folder, capsys, tmp_path):
    assert main(["eval", "--model", folder, "--data", str(tmp_path / "none.txt")]) == 2
    assert "no such data file" in capsys.readouterr().err


def test_quantize_saves_a_model_that_loads(folder, capsys, tmp_path):
    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                "--model",
                folder,
                "--scheme",
                "w4a16",
                "--group-size",
                "32",
                "--method",
                "gptq",
                "--calib-samples",
                "4",
                "--calib-len",
                "16",
                "--lm-head",
                "int8",
                "--kv-cache-dtype",
                "int8",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["bytes_after"] < result["bytes_before"] / 2
    config = json.loads((out / "config.json").read_text())
    assert {g["weights"]["num_bits"] for g in config["quantization_config"]["config_groups"].values()} == {4, 8}
    assert config["kv_cache_dtype"] == "int8"
    assert main(["eval", "--model", str(out), "--data", "builtin", "--max-tokens", "256", "--seq-len", "64"]) == 0
    # the saved format is the default; --kv-cache-dtype overrides it
    assert main(["generate", "hi", "--model", str(out), "--max-tokens", "3", "--kv-cache-dtype", "bfloat16"]) == 0


def test_quantize_analyze_ranks_layers(folder, capsys):
    assert (
        main(
            [
                "quantize",
                "--model",
                folder,
                "--scheme",
                "w8a8-static",
                "--observer",
                "mse",
                "--analyze",
                "--calib-samples",
                "4",
                "--calib-len",
                "16",
                "--eval-tokens",
                "256",
                "--seq-len",
                "64",
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert len(rows) == 14
    deltas = [r["perplexity_delta"] for r in rows]
    assert deltas == sorted(deltas, reverse=True)


def test_quantize_needs_an_output(folder, capsys):
    assert main(["quantize", "--model", folder, "--scheme", "w8a16"]) == 2
    assert "--out" in capsys.readouterr().err


def test_quantize_writes_symmetric_4_bit_by_default_and_asymmetric_on_request(folder, capsys, tmp_path):
    import json

    for flags, symmetric in (([], True), (["--asymmetric"], False)):
        out = tmp_path / f"w4-{symmetric}"
        args = ["quantize", "--model", folder, "--scheme", "w4a16", "--group-size", "32", "--out", str(out)]
        assert main(args + flags) == 0
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["config_groups"]["group_0"]["weights"]["symmetric"] is symmetric
    capsys.readouterr()
    assert main(["quantize", "--model", folder, "--scheme", "w8a16", "--asymmetric", "--out", str(tmp_path / "x")]) == 2
    assert "w8a16 has symmetric int8 weights" in capsys.readouterr().err


def test_quantize_static_smoothquant_auto_with_gptq_weights(folder, capsys, tmp_path):
    out = tmp_path / "s"
    assert (
        main(
            [
                "quantize",
                "--model",
                folder,
                "--scheme",
                "w8a8-static",
                "--method",
                "smoothquant",
                "--alpha",
                "auto",
                "--gptq",
                "--calib-samples",
                "4",
                "--calib-len",
                "16",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    acts = [g["input_activations"] for g in config["config_groups"].values()]
    assert acts and all(a["strategy"] == "tensor" and not a["dynamic"] for a in acts)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "rtn", "--gptq"], "--gptq rounds SmoothQuant"),
        (["--method", "smoothquant", "--alpha", "lots"], "expected a number in [0, 1] or 'auto'"),
    ],
)
def test_quantize_refuses_bad_smoothquant_options(folder, capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) if "lots" in argv else contextlib.nullcontext():
        code = main(["quantize", "--model", folder, "--scheme", "w8a8-static", *argv, "--out", str(tmp_path / "x")])
        assert code == 2
    assert message in capsys.readouterr().err


def test_prune_unstructured_saves_a_sparse_model_that_loads(folder, capsys, tmp_path):
    out = tmp_path / "sparse"
    assert (
        main(
            [
                "prune",
                "--model",
                folder,
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--calib-samples",
                "4",
                "--calib-len",
                "32",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    q = next(layer for layer in result["sparsity"]["layers"] if layer["name"].endswith("layers.0.self_attn.q_proj"))
    assert q["sparsity"] == 0.5
    import tuili

    again = tuili.load(out)
    assert float((again.module.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == 0.5
    assert any(step.get("step") == "pruned" for step in again.provenance)


def test_prune_structured_shrinks_the_saved_model(folder, capsys, tmp_path):
    out = tmp_path / "small"
    assert (
        main(
            [
                "prune",
                "--model",
                folder,
                "--structured",
                "mlp=0.25,heads=0.5,layers=1",
                "--importance",
                "l2",
                "--calib-samples",
                "4",
                "--calib-len",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_hidden_layers"]) == (72, 2, 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sparsity", "1.5"], "[0, 1)"),
        (["--pattern", "4:2"], "0 < N < M"),
        (["--pattern", "half"], "N:M"),
        (["--structured", "mlp=x"], "needs a number"),
        (["--structured", "experts=0.5"], "no mixture-of-experts layers"),
        (["--structured", "bits=0.5"], "mlp=F,experts=F,heads=F,layers=N"),
        (["--pattern", "2:4", "--iterations", "3"], "--iterations"),
    ],
)
def test_prune_bad_requests_exit_2(folder, capsys, tmp_path, argv, message):
    assert (
        main(
            [
                "prune",
                "--model",
                folder,
                *argv,
                "--out",
                str(tmp_path / "x"),
                "--calib-samples",
                "2",
                "--calib-len",
                "16",
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "stages, names",
    [
        (["--prune", "2:4", "--prune-method", "magnitude"], ["prune 2:4 magnitude"]),
        (
            ["--prune", "mlp=0.5", "--distill-steps", "2"],
            ["prune mlp=0.5", "distill 2 steps from {folder} (T=2, α=0.5)"],
        ),
    ],
)
def test_optimize_with_prune_and_distill_stages(folder, capsys, tmp_path, stages, names):
    (tmp_path / "t.txt").write_text("some text to score and to calibrate on " * 60)
    assert (
        main(
            [
                "optimize",
                "--model",
                folder,
                "--data",
                str(tmp_path / "t.txt"),
                "--seq-len",
                "64",
                "--max-tokens",
                "256",
                "--calib-samples",
                "2",
                "--json",
                "--report",
                str(tmp_path / "r"),
                *stages,
            ]
        )
        == 0
    )
    result = [s["name"] for s in json.loads(capsys.readouterr().out)["stages"]]
    assert result == ["baseline"] + [name.format(folder=folder) for name in names]


def test_prune_iteratively_with_recovery_and_evaluation(folder, capsys, tmp_path):
    assert (
        main(
            [
                "prune",
                "--model",
                folder,
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--iterations",
                "2",
                "--recovery-steps",
                "1",
                "--calib-samples",
                "4",
                "--calib-len",
                "32",
                "--eval",
                "--eval-tokens",
                "128",
                "--seq-len",
                "32",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert [round(s["sparsity"], 2) for s in result["stages"]] == [0.25, 0.5]
    assert result["perplexity_after"] > 1 and result["perplexity_before"] > 1


def test_distill_a_pruned_student_saves_it_and_resumes(folder, capsys, tmp_path):
    import tuili

    (tmp_path / "t.txt").write_text("a teacher teaches the student what it knows " * 60)
    argv = [
        "distill",
        "--teacher",
        folder,
        "--prune",
        "mlp=0.5",
        "--data",
        str(tmp_path / "t.txt"),
        "--eval-data",
        str(tmp_path / "t.txt"),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-tokens",
        "1024",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--out",
        str(tmp_path / "student"),
        "--json",
    ]
    assert main(argv + ["--steps", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["steps"] == 2 and first["student_parameters"] < first["teacher_parameters"]
    assert first["student_perplexity"] > 1 and first["teacher_perplexity"] > 1
    student = tuili.load(first["out"])
    assert student.config.intermediate_size == 48
    assert [s["step"] for s in student.provenance][-3:] == ["distilled", "saved", "loaded"]
    run = tmp_path / "student.run"
    assert (run / "log.csv").is_file() and (run / "checkpoints" / "step-000002").is_dir()
    # resuming with more steps is refused (the schedule depends on them) ...
    assert main(argv + ["--steps", "4", "--resume"]) == 2
    assert "other settings (steps)" in capsys.readouterr().err


def test_distill_a_student_cut_to_sizes_with_attention_and_hidden_losses(folder, capsys, tmp_path):
    (tmp_path / "t.txt").write_text("a teacher teaches the student what it knows " * 60)
    assert (
        main(
            [
                "distill",
                "--teacher",
                folder,
                "--student",
                "layers=1,mlp=64",
                "--data",
                str(tmp_path / "t.txt"),
                "--eval-data",
                str(tmp_path / "t.txt"),
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--steps",
                "2",
                "--attention-loss",
                "kl",
                "--hidden-loss",
                "cosine",
                "--eval-tokens",
                "1024",
                "--out",
                str(tmp_path / "student"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "student saved to" in captured.out and "teacher layer [1]" in captured.err


def test_distill_refuses_a_student_of_another_vocabulary(folder, capsys, tmp_path):
    from helpers import tiny_config, tiny_tokenizer

    from tuili.models import LlamaForCausalLM, Model

    config = tiny_config()
    config.vocab_size = 300
    Model(LlamaForCausalLM(config), tiny_tokenizer(), config, "random").save(tmp_path / "other")
    assert (
        main(
            [
                "distill",
                "--teacher",
                folder,
                "--student",
                str(tmp_path / "other"),
                "--steps",
                "1",
                "--out",
                str(tmp_path / "student"),
            ]
        )
        == 2
    )
    assert "259 vocabulary entries and the student 300" in capsys.readouterr().err


def test_the_cli_offers_exactly_what_the_registries_hold():
    """Choices are read from the registries, so a new method or format appears on the CLI by itself."""
    from tuili.cli import parser
    from tuili.kernels.kv_format import KV_CACHE_FORMATS
    from tuili.prune.methods import METHODS as PRUNE_METHODS
    from tuili.quant.config import SCHEMES
    from tuili.quant.methods import METHODS as QUANT_METHODS

    commands = {name: sub for action in parser()._subparsers._group_actions for name, sub in action.choices.items()}

    def choices(command, flag):
        return next(tuple(a.choices) for a in commands[command]._actions if flag in a.option_strings)

    assert choices("quantize", "--method") == choices("optimize", "--method") == tuple(QUANT_METHODS)
    assert choices("quantize", "--scheme") == choices("optimize", "--scheme") == tuple(SCHEMES)
    assert choices("prune", "--method") == choices("optimize", "--prune-method") == tuple(PRUNE_METHODS)
    for command in ("quantize", "optimize", "search"):
        assert choices(command, "--kv-cache-dtype") == KV_CACHE_FORMATS
    for command in ("quantize", "prune"):  # the API's word
        assert any("--ignore" in a.option_strings for a in commands[command]._actions)


def test_python_m_tuili_cli_runs():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tuili.cli", "recipes"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "w8a16" in result.stdout, result.stderr


def test_version(capsys):
    import tuili
    from tuili.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tuili {tuili.__version__}"
