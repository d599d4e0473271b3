"""The distillation trainer: it learns, resumes exactly, scales over processes, and refuses bad set-ups."""

import csv
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_tiny

from tuili.distill import (
    DistillConfig,
    Distiller,
    DistillError,
    distill_,
    soft_loss,
    student_from_teacher,
)

CALIB = torch.randint(0, 259, (4, 24), generator=torch.Generator().manual_seed(1))
TRAIN = torch.randint(0, 259, (16, 24), generator=torch.Generator().manual_seed(2))
FAST = {"lr": 1e-2, "warmup_steps": 1, "batch_size": 4, "bf16": False, "eval_every": 0, "checkpoint_every": 0}


def pair():
    teacher = random_tiny()
    return teacher, student_from_teacher(teacher, "mlp=0.5,heads=0.5", CALIB)


@torch.no_grad()
def kl_to_teacher(teacher, student, ids=TRAIN):
    return soft_loss(student.module(ids).logits, teacher.module(ids).logits, 1.0).item()


def test_distillation_drives_the_students_kl_to_the_teacher_down():
    teacher, student = pair()
    before = kl_to_teacher(teacher, student)
    result = Distiller(
        teacher, student, TRAIN, DistillConfig(steps=30, alpha=1.0, temperature=1.0, **FAST), progress=False
    ).train()
    assert kl_to_teacher(teacher, student) < 0.5 * before
    assert result.steps == 30 and len(result.log) == 30
    assert student.provenance[-1]["step"] == "distilled"


@pytest.mark.parametrize(
    "extra", [{"attention_loss": "kl"}, {"attention_loss": "cosine", "hidden_loss": "mse"}, {"hidden_loss": "cosine"}]
)
def test_attention_and_hidden_losses_train_and_fall(extra):
    teacher, student = pair()
    weights = {"alpha": 0.0, "attention_weight": 1000.0, "hidden_weight": 10.0, "lr": 3e-3}  # these losses lead
    result = Distiller(
        teacher, student, TRAIN, DistillConfig(steps=25, **{**FAST, **weights, **extra}), progress=False
    ).train()
    for name in ("attention", "hidden"):
        if f"{name}_loss" in extra:
            first, last = result.log[0][name], result.log[-1][name]
            assert last < first, (name, first, last)


def test_distill_is_an_in_place_verb_that_returns_the_model():
    teacher, student = pair()
    before = kl_to_teacher(teacher, student)
    config = DistillConfig(steps=10, alpha=1.0, temperature=1.0, **FAST)
    assert distill_(student, config, teacher=teacher, train=TRAIN, progress=False) is student
    assert kl_to_teacher(teacher, student) < before
    assert student.provenance[-1]["step"] == "distilled" and student.provenance[-1]["steps"] == 10


def test_plain_fine_tuning_needs_no_teacher_and_lowers_the_label_loss():
    _, student = pair()
    result = Distiller(None, student, TRAIN, DistillConfig(steps=20, alpha=0.0, **FAST), progress=False).train()
    assert result.log[-1]["hard"] < result.log[0]["hard"]
    assert result.log[0]["soft"] is None
    assert student.provenance[-1]["step"] == "fine-tuned"
    with pytest.raises(DistillError, match="need a teacher"):
        Distiller(None, student, TRAIN, DistillConfig(alpha=0.5))


def test_learning_rate_warms_up_then_decays_to_min_lr():
    config = DistillConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=4)
    lrs = [config.lr_at(s) for s in range(10)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    assert config.lr_at(10) == pytest.approx(0.1)


class _Stop(Exception):
    pass


def test_resuming_from_a_checkpoint_gives_the_same_next_losses_and_weights(tmp_path):
    config = DistillConfig(steps=6, alpha=0.5, grad_accum=2, **{**FAST, "batch_size": 3, "checkpoint_every": 2})
    teacher, straight = pair()
    whole = Distiller(teacher, straight, TRAIN, config, run_dir=tmp_path / "a", progress=False).train()

    teacher, student = pair()
    trainer = Distiller(teacher, student, TRAIN, config, run_dir=tmp_path / "b", progress=False)
    step = trainer.train_step

    def crash_after_step_3():
        if trainer.step == 3:
            raise _Stop
        return step()

    trainer.train_step = crash_after_step_3
    with pytest.raises(_Stop):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000002"]

    teacher, fresh = pair()
    resumed = Distiller(teacher, fresh, TRAIN, config, run_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 2
    rest = resumed.train()
    assert [r["loss"] for r in rest.log] == [r["loss"] for r in whole.log]  # the same losses, bit for bit
    for (name, a), b in zip(straight.module.state_dict().items(), fresh.module.state_dict().values()):
        assert torch.equal(a, b), name
    with open(tmp_path / "b" / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 6
    json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[0])
    # the newest two checkpoints are kept
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


def test_resuming_with_other_settings_is_refused(tmp_path):
    config = DistillConfig(steps=2, **{**FAST, "checkpoint_every": 1})
    teacher, student = pair()
    Distiller(teacher, student, TRAIN, config, run_dir=tmp_path, progress=False).train()
    other = DistillConfig(steps=2, **{**FAST, "checkpoint_every": 1, "lr": 0.5})
    with pytest.raises(DistillError, match="other settings \\(lr\\)"):
        Distiller(teacher, student, TRAIN, other, run_dir=tmp_path, resume=True)


def test_cached_teacher_logits_replace_the_teachers_forward_pass(tmp_path):
    config = DistillConfig(steps=8, alpha=0.8, logits_cache=str(tmp_path / "cache"), cache_top_k=300, **FAST)
    teacher, first = pair()
    calls = []
    teacher.module.register_forward_hook(lambda *a: calls.append(1))
    run1 = Distiller(teacher, first, TRAIN, config, progress=False)
    log1 = run1.train().log
    assert len(calls) == 4 and run1.cache.hits == 16  # epoch 2 (steps 5-8, 16 sequences) hits the cache
    calls.clear()
    _, second = pair()
    run2 = Distiller(teacher, second, TRAIN, config, progress=False)
    log2 = run2.train().log
    assert calls == [] and run2.cache.misses == 0
    assert [r["loss"] for r in log2] == pytest.approx([r["loss"] for r in log1], rel=1e-6)
    # k ≥ vocabulary: the cached loss is the exact one
    teacher, dense = pair()
    exact = Distiller(teacher, dense, TRAIN, DistillConfig(steps=8, alpha=0.8, **FAST), progress=False).train().log
    assert [r["soft"] for r in log1] == pytest.approx([r["soft"] for r in exact], rel=1e-4)
    other_teacher = random_tiny(seed=5)
    with pytest.raises(DistillError, match="made with another teacher"):
        Distiller(other_teacher, second, TRAIN, config)


def test_bad_settings_are_refused_with_clear_errors():
    teacher, student = pair()
    with pytest.raises(DistillError, match="alpha"):
        DistillConfig(alpha=2.0)
    with pytest.raises(DistillError, match="attention loss must be one of mse, kl, cosine"):
        DistillConfig(attention_loss="l2")
    with pytest.raises(DistillError, match="logits only"):
        DistillConfig(logits_cache="x", hidden_loss="mse")
    with pytest.raises(DistillError, match="steps must be at least 1"):
        DistillConfig(steps=0)
    with pytest.raises(Exception, match="cannot fill one batch"):
        Distiller(teacher, student, TRAIN[:2], DistillConfig(batch_size=4))
    from tuili.quant import Int8WeightOnly, quantize_

    quantize_(student, Int8WeightOnly())
    with pytest.raises(DistillError, match="quantized and cannot be trained"):
        Distiller(teacher, student, TRAIN, DistillConfig())


def test_two_processes_take_the_same_step_as_one_with_the_same_global_batch(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from ddp_worker import trained

    single = trained(batch_size=4)  # one process, 4 sequences per micro-step
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            str(Path(__file__).parent / "ddp_worker.py"),
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    assert ddp["world"] == 2
    assert ddp["losses"][0] == pytest.approx(single.log[0]["loss"], rel=1e-5)
    for name, weight in single.student.module.state_dict().items():
        torch.testing.assert_close(ddp["student"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
