"""lm-evaluation-harness against `tuili serve`, offline, on a local task (tests/data/lm_eval): its
`local-completions` model (log-likelihoods through echo + logprobs, tokens through the server's
/tokenizer_info, /tokenize and /detokenize) and `local-chat-completions` (greedy generation) give
what its `hf` back end gives on the same weights in transformers, document by document."""

import json
import os
import shutil
from pathlib import Path

import lm_eval
import pytest
from helpers import save_hf_tiny
from live import MODEL, live_server

import tuili

DATA = Path(__file__).parent.parent / "data" / "lm_eval"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """The task folder, its YAML pointing at the data by absolute path."""
    folder = tmp_path_factory.mktemp("tasks")
    for name in ("tuili_mc.yaml", "tuili_gen.yaml"):
        text = (DATA / name).read_text()
        for data in ("multiple_choice.jsonl", "generation.jsonl"):
            text = text.replace(f"test: {data}", f"test: {DATA / data}")
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def tasks(task_folder):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_folder))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    save_hf_tiny("llama-gqa", folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def evaluate(tasks, model: str, model_args: dict, task: str, **options) -> dict:
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], task_manager=tasks, log_samples=True, **options
    )


def per_doc(result: dict, task: str) -> list:
    return [sample["filtered_resps"] for sample in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_local_completions_and_chat_completions_agree_with_the_hf_back_end(tasks, hf_folder):
    hf_args = {"pretrained": str(hf_folder), "dtype": "float32", "device": "cpu"}
    hf_mc = evaluate(tasks, "hf", hf_args, "tuili_mc", batch_size=4)
    hf_gen = evaluate(tasks, "hf", hf_args, "tuili_gen", batch_size=4, apply_chat_template=True)
    with live_server(tuili.load(str(hf_folder))) as (base, _):
        served_mc = evaluate(
            tasks,
            "local-completions",
            {"model": MODEL, "base_url": f"{base}/v1/completions", "tokenizer_backend": "auto", "num_concurrent": 2},
            "tuili_mc",
        )
        served_gen = evaluate(
            tasks,
            "local-chat-completions",
            {"model": MODEL, "base_url": f"{base}/v1/chat/completions", "num_concurrent": 2},
            "tuili_gen",
            apply_chat_template=True,
        )
    mc_hf, mc_served = per_doc(hf_mc, "tuili_mc"), per_doc(served_mc, "tuili_mc")
    assert len(mc_served) == len(mc_hf) == 24
    for ours, theirs in zip(mc_served, mc_hf):  # per choice: (log-likelihood, is greedy)
        assert [round(ll, 3) for ll, _ in ours] == pytest.approx([round(ll, 3) for ll, _ in theirs], abs=2e-3)
    acc = served_mc["results"]["tuili_mc"]["acc,none"], hf_mc["results"]["tuili_mc"]["acc,none"]
    assert abs(acc[0] - acc[1]) <= 0.005
    assert per_doc(served_gen, "tuili_gen") == per_doc(hf_gen, "tuili_gen")
    match = served_gen["results"]["tuili_gen"]["exact_match,none"], hf_gen["results"]["tuili_gen"]["exact_match,none"]
    assert match[0] == match[1]


def test_the_harness_in_process_agrees_with_the_hf_back_end(tasks, hf_folder):
    """`tuili eval --tasks`: lm-eval on the tuili model in this process, no server."""
    from tuili.pipeline.harness import TuiliLM

    hf_args = {"pretrained": str(hf_folder), "dtype": "float32", "device": "cpu"}
    hf_mc = evaluate(tasks, "hf", hf_args, "tuili_mc", batch_size=4)
    hf_gen = evaluate(tasks, "hf", hf_args, "tuili_gen", batch_size=4, apply_chat_template=True)
    lm = TuiliLM(tuili.load(str(hf_folder)))
    ours_mc = lm_eval.simple_evaluate(model=lm, tasks=["tuili_mc"], task_manager=tasks, log_samples=True)
    ours_gen = lm_eval.simple_evaluate(
        model=lm, tasks=["tuili_gen"], task_manager=tasks, log_samples=True, apply_chat_template=True
    )
    for ours, theirs in zip(per_doc(ours_mc, "tuili_mc"), per_doc(hf_mc, "tuili_mc")):
        assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
        assert [g for _, g in ours] == [g for _, g in theirs]
    assert ours_mc["results"]["tuili_mc"]["acc,none"] == hf_mc["results"]["tuili_mc"]["acc,none"]
    assert per_doc(ours_gen, "tuili_gen") == per_doc(hf_gen, "tuili_gen")


def test_tuili_eval_tasks_gives_the_harness_results(task_folder, hf_folder, capsys):
    from tuili.cli import main

    code = main(
        ["eval", "--model", str(hf_folder), "--tasks", "tuili_mc", "--include-path", str(task_folder), "--json"]
    )
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert 0 <= results["tuili_mc"]["acc,none"] <= 1
