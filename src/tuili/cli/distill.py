"""`tuili distill`: train a student from a teacher."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tuili.cli.common import (
    load_model,
)


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="train a smaller student from a teacher (logits, attention, hidden states)")
    p.add_argument("--teacher", default="default", help="'default', an HF folder, a .gguf file or a hub id")
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--student", help="a model spec, or sizes cut from the teacher: layers=N,mlp=M")
    student.add_argument(
        "--prune", metavar="SPEC", help="the teacher, structurally pruned: mlp=F,experts=F,heads=F,layers=N"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights (master copy)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: all cores)")
    p.add_argument(
        "--data",
        default="builtin",
        help="training text ('builtin' uses its calibration split; 'self:N', the teacher's own answers to N "
        "prompts made from it: what a draft model for speculative decoding should learn)",
    )
    p.add_argument("--eval-data", default="builtin", help="evaluation text ('builtin' uses its evaluation split)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed training sequence")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--min-lr", type=float, help="where the cosine decay ends (default: lr / 10)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up (default: 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft loss; 0 = plain fine-tuning")
    p.add_argument("--attention-loss", choices=["mse", "kl", "cosine"])
    p.add_argument("--attention-weight", type=float, default=1.0)
    p.add_argument("--hidden-loss", choices=["mse", "cosine"])
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 even where bf16 instructions exist")
    p.add_argument("--logits-cache", metavar="DIR", help="keep the teacher's top-k logits here and reuse them")
    p.add_argument("--cache-top-k", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=50, help="student perplexity every N steps (0: at the end)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--importance", default="activation", help="--prune / --student sizes: neuron importance")
    p.add_argument("--calib-samples", type=int, default=32, help="--prune: calibration windows for importance")
    p.add_argument("--run-dir", type=Path, help="checkpoints and logs (default: OUT.run beside --out)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder to write the trained student to")
    p.add_argument(
        "--draft-report",
        action="store_true",
        help="measure the student as the teacher's speculative-decoding draft (acceptance, batch-1 speed-up)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_distill)


def _distill(args) -> None:
    from tuili.data import eval_windows, load_text
    from tuili.data.batches import packed_sequences
    from tuili.distill import Distiller
    from tuili.distill.runtime import init_distributed

    config = _config(args)
    rank, _ = init_distributed()
    run_dir = args.run_dir or args.out.with_name(args.out.name + ".run")
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = load_model(argparse.Namespace(model=args.teacher, dtype=args.dtype, threads=None, keep_quantized=False))
    tok = teacher.tokenizer
    train_text = tok.encode(_training_text(args, teacher, load_text, run_dir))
    student = _student(args, teacher, train_text)
    train = packed_sequences(train_text, args.seq_len)
    windows = eval_windows(tok.encode(load_text(args.eval_data, "evaluation")), 512, args.eval_tokens)
    trainer = Distiller(teacher, student, train, config, windows, run_dir, args.resume)
    if rank == 0 and trainer.align is not None:
        print(
            f"student layer i stands for teacher layer {list(trainer.align.layers)} ({trainer.align.source})",
            file=sys.stderr,
        )
    result = trainer.train()
    if rank == 0:
        _report(args, teacher, student, result, run_dir)


def _training_text(args, teacher, load_text, run_dir: Path) -> str:
    """--data's text; with 'self:N', the teacher's own answers (generated here, greedy, and kept in
    the run folder as self_data.txt, which a later run can take as --data)."""
    if not args.data.startswith("self"):
        return load_text(args.data, "calibration")
    from tuili.models.io import atomic_write_text
    from tuili.pipeline.draft import self_outputs

    _, _, count = args.data.partition(":")
    if count and not count.isdigit():
        raise ValueError(f"--data {args.data}: write self:N with N the number of prompts, such as self:256")
    print(f"generating the teacher's answers to {count or 256} prompts...", file=sys.stderr)
    text = self_outputs(teacher, int(count or 256))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "self_data.txt", text)
    return text


def _config(args):
    """The run's DistillConfig from the flags (min_lr: a tenth of lr; warm-up: a twentieth of the steps)."""
    from tuili.distill import DistillConfig

    return DistillConfig(
        steps=args.steps,
        lr=args.lr,
        min_lr=args.lr / 10 if args.min_lr is None else args.min_lr,
        warmup_steps=max(1, args.steps // 20) if args.warmup_steps is None else args.warmup_steps,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm,
        temperature=args.temperature,
        alpha=args.alpha,
        attention_loss=args.attention_loss,
        attention_weight=args.attention_weight,
        hidden_loss=args.hidden_loss,
        hidden_weight=args.hidden_weight,
        bf16=False if args.no_bf16 else None,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        logits_cache=args.logits_cache,
        cache_top_k=args.cache_top_k,
        seed=args.seed,
    )


def _student(args, teacher, train_text: list[int]):
    """The student: pruned from the teacher (--prune), made at sizes (--student k=v,...), or loaded."""
    from tuili.data import calibration_samples
    from tuili.distill import student_from_sizes, student_from_teacher
    from tuili.distill.students import parse_sizes
    from tuili.models import load

    if not (args.prune or (args.student and "=" in args.student)):
        return load(args.student, dtype=args.dtype)
    calib = calibration_samples(train_text, args.calib_samples, min(512, len(train_text)), args.seed)
    if args.prune:
        return student_from_teacher(teacher, args.prune, calib, args.importance)
    return student_from_sizes(teacher, **parse_sizes(args.student), calib=calib)


def _report(args, teacher, student, result, run_dir) -> None:
    """Save the student, write summary.json in the run folder, and print the summary."""
    from tuili.models.io import atomic_write_text
    from tuili.pipeline.report import markdown_table

    out = student.save(args.out)
    summary = {
        "out": str(out),
        "run_dir": str(run_dir.absolute()),
        "steps": result.steps,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "seconds": round(result.seconds, 1),
        "student_parameters": student.config.num_parameters(),
        "teacher_parameters": teacher.config.num_parameters(),
        "student_perplexity": result.student_perplexity,
        "teacher_perplexity": result.teacher_perplexity,
    }
    if args.draft_report:
        from tuili.pipeline.draft import draft_report

        student.module.eval()
        summary["as_draft"] = draft_report(teacher, student)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    rows = [["parameters", f"{summary['teacher_parameters']:,}", f"{summary['student_parameters']:,}"]]
    if result.student_perplexity is not None:
        rows.append(["perplexity", f"{result.teacher_perplexity:.4f}", f"{result.student_perplexity:.4f}"])
    print(markdown_table(["", "teacher", "student"], rows))
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s); "
        f"student saved to {out}; logs and checkpoints in {run_dir}"
    )
    if "as_draft" in summary:
        d = summary["as_draft"]
        print(
            f"as the teacher's draft ({d['draft_tokens_a_step']} tokens a step, batch 1, greedy): acceptance "
            f"{d['acceptance_rate']:.0%}, {d['tokens_a_check']} tokens a check, decode "
            f"{d['plain_tokens_per_second']} -> {d['speculative_tokens_per_second']} tokens/s ({d['speed_up']}x)"
        )
