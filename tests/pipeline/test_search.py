"""tuili search: the planner spends a budget where it saves the most loss, never over it; the
search applies the plan and reports a budget met only when the measurement says so."""

import itertools
import json
import random
import re

import pytest
import torch

from tests.helpers import random_tiny
from tuili.cli import main
from tuili.data import eval_windows, load_text, perplexity
from tuili.models import load
from tuili.pipeline.analysis import analyze
from tuili.pipeline.search import SearchError, plan, search
from tuili.pipeline.sensitivity import LayerCost
from tuili.quant.linear import quantized_layers


def random_costs(n, seed):
    rng = random.Random(seed)
    costs = []
    for i in range(n):
        size = rng.choice([100, 300, 1000])
        s = rng.uniform(0.1, 10)
        costs.append(
            LayerCost(
                f"l{i}",
                (size, 1),
                {"float": 0.0, "int8": s * 0.01, "int4-g32": s * rng.uniform(0.3, 1), "int4-g128": s},
                {"float": 4 * size, "int8": size, "int4-g32": size * 0.6, "int4-g128": size * 0.52},
            )
        )
    return costs


def exhaustive(costs, budget):
    best = float("inf")
    for combo in itertools.product(*(list(c.delta) for c in costs)):
        if sum(c.num_bytes[o] for c, o in zip(costs, combo)) <= budget:
            best = min(best, sum(c.delta[o] for c, o in zip(costs, combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_stays_within_budget_and_near_the_exhaustive_optimum(seed):
    costs = random_costs(5, seed)
    lowest = sum(min(c.num_bytes.values()) for c in costs)
    highest = sum(max(c.num_bytes.values()) for c in costs)
    for budget in (lowest, (lowest + highest) / 3, (lowest + highest) / 2, highest):
        choice = plan(costs, budget)
        spent = sum(c.num_bytes[choice[c.name]] for c in costs)
        loss = sum(c.delta[choice[c.name]] for c in costs)
        assert spent <= budget
        # greedy on convex hulls: optimal but for the one upgrade that no longer fit
        slack = max(max(c.delta.values()) for c in costs)
        assert loss <= exhaustive(costs, budget) + slack
    assert set(plan(costs, highest).values()) == {"float"}
    assert set(plan(costs, lowest).values()) == {"int4-g128"}


def test_plan_prefers_the_sensitive_layer_for_the_extra_bytes():
    robust = LayerCost("robust", (1, 1), {"int8": 0.001, "int4-g128": 0.002}, {"int8": 100, "int4-g128": 50})
    fragile = LayerCost("fragile", (1, 1), {"int8": 0.001, "int4-g128": 1.0}, {"int8": 100, "int4-g128": 50})
    assert plan([robust, fragile], 150) == {"robust": "int4-g128", "fragile": "int8"}


def test_plan_refuses_a_budget_below_the_cheapest_plan():
    with pytest.raises(SearchError, match="below the cheapest plan"):
        plan(random_costs(3, 0), 10)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "t.txt"
    path.write_text("a budget is met when the measurement says so " * 300)
    return str(path)


def test_search_meets_a_byte_budget_as_measured_and_the_result_saves_and_loads(text, tmp_path):
    model = random_tiny()
    budget = int(analyze(model).num_bytes * 0.45)
    searched, result = search(
        model, max_bytes=budget, data=text, seq_len=64, max_tokens=1024, calib_samples=2, calib_len=32
    )
    assert result.met == {"max_bytes": True} and result.result.num_bytes <= budget
    assert analyze(searched).num_bytes == result.result.num_bytes
    assert set(result.choice.values()) - {"float"} and quantized_layers(searched.module)
    assert not quantized_layers(model.module)  # the plan went to a copy
    assert "**met**" in result.to_markdown() and json.dumps(result.to_dict())
    saved = searched.save(tmp_path / "m")
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load(saved).module(ids).logits, searched.module(ids).logits)


def test_search_reports_an_unmet_quality_budget_instead_of_claiming_it(text):
    model = random_tiny()
    _, result = search(
        model,
        max_bytes=int(analyze(model).num_bytes * 0.4),
        max_ppl_increase=-50.0,
        data=text,
        seq_len=64,
        max_tokens=512,
        calib_samples=2,
        calib_len=32,
    )
    assert result.met["max_ppl_increase"] is False and "NOT met" in result.to_markdown()


def test_search_refuses_bad_budgets_and_quantized_models(text):
    with pytest.raises(SearchError, match="one budget"):
        search(random_tiny(), data=text)
    with pytest.raises(SearchError, match="one budget"):
        search(random_tiny(), max_bytes=10**6, min_speedup=2.0, data=text)
    with pytest.raises(SearchError, match="above 1"):
        search(random_tiny(), min_speedup=0.5, data=text)
    model = random_tiny()
    searched, _ = search(
        model,
        max_bytes=int(analyze(model).num_bytes * 0.5),
        data=text,
        seq_len=64,
        max_tokens=256,
        calib_samples=1,
        calib_len=16,
    )
    with pytest.raises(SearchError, match="already quantized"):
        search(searched, max_bytes=10**6, data=text)


def test_search_cli(text, tmp_path, capsys):
    folder = random_tiny().save(tmp_path / "tiny")
    assert (
        main(
            [
                "search",
                "--model",
                str(folder),
                "--data",
                text,
                "--seq-len",
                "64",
                "--max-tokens",
                "512",
                "--max-bytes",
                "200KiB",
                "--calib-samples",
                "2",
                "--mlp-sparsity",
                "0",
                "0.25",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "weights ≤ 200.0 KiB" in out and "**met**" in out and (tmp_path / "out").is_dir()
    assert "Sparsities tried" in out and re.search(r"\|\s+25\.0% \|", out)
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--model", str(folder), "--max-bytes", "lots"])
    assert exit_.value.code == 2
    assert "a size is a number of bytes" in capsys.readouterr().err


def test_a_speed_no_plan_can_reach_is_refused_after_measuring_the_fastest_plan(text):
    with pytest.raises(SearchError, match=r"the fastest plan .* decodes .* below the 1000.00× asked"):
        search(random_tiny(), min_speedup=1000.0, data=text, seq_len=64, max_tokens=256, calib_samples=1, calib_len=16)


def _cheapest_bytes(model, text):
    """Weights of the smallest plan the search can make without pruning (every layer at its cheapest format)."""
    from tuili.data import calibration_samples, load_text
    from tuili.pipeline.sensitivity import layer_costs

    calib = calibration_samples(model.tokenizer.encode(load_text(text, "calibration")), 1, 16)
    costs = layer_costs(model, calib, time_layers=False)
    fixed = analyze(model).num_bytes - sum(c.num_bytes["float"] for c in costs)
    return fixed + sum(min(c.num_bytes.values()) for c in costs)


def test_a_budget_only_a_sparser_model_meets_is_met_by_removing_mlp_neurons(text, tmp_path):
    model = random_tiny()
    width = model.config.intermediate_size
    budget = _cheapest_bytes(model, text) - 1  # no plan of formats alone fits
    searched, result = search(
        model,
        max_bytes=budget,
        mlp_sparsity=(0.0, 0.5),
        data=text,
        seq_len=64,
        max_tokens=512,
        calib_samples=2,
        calib_len=32,
    )
    assert result.mlp_sparsity == 0.5 and result.met == {"max_bytes": True}
    assert searched.config.intermediate_size == width // 2 and model.config.intermediate_size == width
    assert analyze(searched).num_bytes == result.result.num_bytes <= budget
    assert "with 0.0% of MLP neurons removed the smallest plan" in result.candidates[0]["skipped"]
    assert "MLP neurons removed first: 50.0%" in result.to_markdown()
    assert "no: its smallest plan weighs" in result.to_markdown()  # the sparsity that could not meet it
    saved = load(searched.save(tmp_path / "m"))
    assert saved.config.intermediate_size == width // 2 and quantized_layers(saved.module)


def test_each_sparsity_gets_a_measured_plan_and_the_best_that_meets_the_budget_wins(text):
    model = random_tiny()
    budget = int(analyze(model).num_bytes * 0.5)
    _, result = search(
        model,
        max_bytes=budget,
        mlp_sparsity=(0.25, 0.0),
        data=text,
        seq_len=64,
        max_tokens=512,
        calib_samples=2,
        calib_len=32,
    )
    assert [c["mlp_sparsity"] for c in result.candidates] == [0.0, 0.25]
    assert all(c["met"] and c["num_bytes"] <= budget for c in result.candidates)
    best = min(result.candidates, key=lambda c: c["perplexity"])
    assert result.mlp_sparsity == best["mlp_sparsity"]
    assert result.result.quality.perplexity == best["perplexity"]
    assert {a["mlp_sparsity"] for a in result.attempts} == {0.0, 0.25}
    assert "Sparsities tried" in result.to_markdown()


def test_a_budget_no_sparsity_meets_says_what_each_would_weigh(text):
    model = random_tiny()
    with pytest.raises(SearchError, match=r"no plan meets the budget: with 0\.0% .* weighs .*; with 50\.0% .* weighs"):
        search(
            model,
            max_bytes=1000,
            mlp_sparsity=(0.0, 0.5),
            data=text,
            seq_len=64,
            max_tokens=256,
            calib_samples=1,
            calib_len=16,
        )


def test_every_plan_gets_the_kv_cache_format_asked_and_is_measured_with_it(text, tmp_path):
    model = random_tiny()
    searched, result = search(
        model,
        max_bytes=int(analyze(model).num_bytes * 0.5),
        mlp_sparsity=(0.0,),
        kv_cache="int8",
        data=text,
        seq_len=64,
        max_tokens=512,
        calib_samples=2,
        calib_len=32,
    )
    assert searched.config.kv_cache_dtype == "int8" and model.config.kv_cache_dtype is None
    windows = eval_windows(searched.tokenizer.encode(load_text(text, "evaluation")), 64, 512)
    assert perplexity(searched.module, windows, progress=False).perplexity == result.result.quality.perplexity
    assert load(searched.save(tmp_path / "m")).config.kv_cache_dtype == "int8"
    with pytest.raises(SearchError, match="unknown KV cache format 'fp8'"):
        search(model, max_bytes=10**6, kv_cache="fp8", data=text)


def test_sparsities_must_be_fractions(text):
    for bad in ((), (0.0, 1.0), (-0.1,)):
        with pytest.raises(SearchError, match=r"MLP sparsities are fractions in \[0, 1\)"):
            search(random_tiny(), max_bytes=10**6, mlp_sparsity=bad, data=text)
