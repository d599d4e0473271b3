"""Recovery of a structurally pruned default model: plain fine-tuning against distillation from
the dense teacher, with the same data, steps, batch, learning rate and schedule, in one run.

    .venv/bin/python benchmarks/distillation.py [--prune mlp=0.5] [--steps 60] [--correct-steps 60]
    .venv/bin/python benchmarks/distillation.py --split --steps 180 --kd 2:0.5 --logits-cache  # docs/distillation.md

Minitron's recipe: the dense model is first fine-tuned on the training text ("teacher
correction", `--correct-steps`; 0 skips it), so the teacher knows the data's distribution; it is
then pruned, and the pruned student recovers by `--steps` of fine-tuning on the labels or of
distillation (soft loss at `--temperature`, weight `--alpha`; any extra `--variant`, e.g.
hidden=cosine). Without correction, fine-tuning on in-domain text learns the domain and
distillation pulls the student toward a teacher that does not know it. Perplexity: the built-in
evaluation split in 512-token windows. Training text: the built-in calibration split packed into
`--seq-len` sequences (the two splits share no topic). "recovered" is the share of the perplexity
lost to pruning that the run won back: (pruned − after) / (pruned − dense).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

import tuili
from tuili.data import calibration_samples, eval_windows, load_text, perplexity
from tuili.data.batches import packed_sequences
from tuili.distill import DistillConfig, Distiller, student_from_teacher
from tuili.pipeline.report import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prune", default="mlp=0.5", help="structured pruning that makes the student")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--correct-steps", type=int, default=60, help="fine-tune the teacher first (0: no)")
    parser.add_argument(
        "--split",
        action="store_true",
        help="correct the teacher on the first half of the training sequences and recover the "
        "student on the second (the teacher has not memorized the recovery text)",
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5], help="one distillation run per value")
    parser.add_argument(
        "--kd",
        action="append",
        default=[],
        metavar="T:ALPHA",
        help="distillation runs at these temperature:alpha pairs (instead of --temperature/--alpha)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="another distillation run: attention=mse|kl|cosine or hidden=mse|cosine",
    )
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--logits-cache",
        action="store_true",
        help="keep the teacher's top-k logits on disk (a temporary folder per run), so epochs "
        "after the first skip the teacher's forward pass",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher = tuili.load("default")
    tok = teacher.tokenizer
    calib_text = tok.encode(load_text("builtin", "calibration"))
    train = packed_sequences(calib_text, args.seq_len)
    correct_on, recover_on = (
        (train[: train.shape[0] // 2], train[train.shape[0] // 2 :]) if args.split else (train, train)
    )
    windows = eval_windows(tok.encode(load_text("builtin", "evaluation")), 512, args.eval_tokens)
    calib = calibration_samples(calib_text, 32, 512, seed=0)

    def ppl(model) -> float:
        return perplexity(model.module, windows, progress=False).perplexity

    base = {
        "lr": args.lr,
        "min_lr": args.lr / 10,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "checkpoint_every": 0,
    }
    original_ppl = ppl(teacher)
    rows = [["the default model (fp32)", f"{teacher.config.num_parameters():,}", f"{original_ppl:.3f}", "", "", "", ""]]
    if args.correct_steps:
        corrected = Distiller(
            None,
            teacher,
            correct_on,
            DistillConfig(**base, steps=args.correct_steps, alpha=0.0, warmup_steps=max(1, args.correct_steps // 20)),
            windows,
        ).train()
        rows.append(
            [
                (
                    f"teacher: fine-tuned {args.correct_steps} steps (teacher correction"
                    f"{', first half' if args.split else ''})"
                ),
                f"{teacher.config.num_parameters():,}",
                f"{corrected.student_perplexity:.3f}",
                "",
                "",
                f"{corrected.tokens_per_second:.0f}",
                f"{corrected.seconds / 60:.1f} min",
            ]
        )
    dense_ppl = ppl(teacher)
    start = time.perf_counter()
    pruned = student_from_teacher(teacher, args.prune, calib)
    prune_seconds = time.perf_counter() - start
    pruned_ppl = ppl(pruned)
    params = {"dense": teacher.config.num_parameters(), "pruned": pruned.config.num_parameters()}

    base.update(steps=args.steps, warmup_steps=max(1, args.steps // 20))
    runs = [("fine-tuning (labels only)", DistillConfig(**base, alpha=0.0))]
    pairs = [tuple(float(x) for x in kd.split(":")) for kd in args.kd] or [(args.temperature, a) for a in args.alpha]
    cache = tempfile.TemporaryDirectory(prefix="tuili-logits-") if args.logits_cache else None
    runs += [
        (
            f"distillation (T={t:g}, α={alpha:g}{', logits cache' if cache else ''})",
            DistillConfig(**base, alpha=alpha, temperature=t, logits_cache=f"{cache.name}/T{t:g}" if cache else None),
        )
        for t, alpha in pairs
    ]
    for variant in args.variant:
        kind, _, loss = variant.partition("=")
        extra = {"attention": {"attention_loss": loss}, "hidden": {"hidden_loss": loss}}[kind]
        runs.append(
            (
                f"distillation + {kind} {loss}",
                DistillConfig(**base, alpha=args.alpha[0], temperature=args.temperature, **extra),
            )
        )
    rows += [
        [
            f"pruned {args.prune} (activation importance, {prune_seconds:.0f} s)",
            f"{params['pruned']:,}",
            f"{pruned_ppl:.3f}",
            "",
            "0%",
            "",
            "",
        ]
    ]
    curves = []
    for name, config in runs:
        student = copy.deepcopy(pruned)
        result = Distiller(teacher if config.needs_teacher else None, student, recover_on, config, windows).train()
        after = result.student_perplexity
        recovered = (pruned_ppl - after) / (pruned_ppl - dense_ppl)
        curve = [(r["step"], r["student_perplexity"]) for r in result.log if r["student_perplexity"]]
        best_step, best = min(curve, key=lambda point: point[1])
        rows.append(
            [
                f"{name}, {args.steps} steps",
                f"{params['pruned']:,}",
                f"{after:.3f}",
                f"{best:.3f} (step {best_step})",
                f"{recovered:.0%}",
                f"{result.tokens_per_second:.0f}",
                f"{result.seconds / 60:.1f} min",
            ]
        )
        curves.append((name, curve))
        print(
            f"{name}: perplexity {after:.3f} ({recovered:.0%} recovered), "
            f"{result.tokens_per_second:.0f} tok/s, {result.seconds:.0f} s",
            flush=True,
        )

    tokens = args.steps * args.batch_size * args.seq_len
    part = " (the second half: recovery; the first half corrected the teacher)" if args.split else ""
    print(
        f"\nTeacher: the default model{' after correction' if args.correct_steps else ''} (fp32, perplexity "
        f"{dense_ppl:.3f}); training: {recover_on.shape[0]} packed "
        f"sequences of {args.seq_len} tokens from the calibration split{part}, {args.steps} steps × "
        f"{args.batch_size} sequences ({tokens:,} tokens, {tokens / recover_on.numel():.1f} epochs), "
        f"AdamW lr {args.lr:g} with "
        f"warm-up and cosine decay; perplexity on {windows.numel():,} evaluation tokens.\n"
    )
    print(
        markdown_table(
            ["model", "parameters", "perplexity", "best along the run", "recovered", "training tok/s", "training time"],
            rows,
        )
    )
    print(f"\nPerplexity during training (student, every {args.eval_every} steps):\n")
    steps = [s for s, _ in curves[0][1]]
    print(
        markdown_table(
            ["run"] + [f"step {s}" for s in steps], [[name] + [f"{p:.3f}" for _, p in curve] for name, curve in curves]
        )
    )


if __name__ == "__main__":
    main()
