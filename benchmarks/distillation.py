"""Recovery of a structurally pruned default model: plain fine-tuning against distillation from
the dense teacher, with the same data, steps, batch, learning rate and schedule, in one run.

    .venv/bin/python benchmarks/distillation.py [--prune mlp=0.5] [--steps 150] [--lr 1e-4]

Rows: the dense teacher, the pruned student before recovery, after `--steps` of fine-tuning on the
labels, after `--steps` of distillation (soft loss at `--temperature`, weight `--alpha`), and any
extra `--variant` (e.g. hidden=cosine). Perplexity: the built-in evaluation split in 512-token
windows. Training text: the built-in calibration split packed into `--seq-len` sequences (the
two splits share no topic). "recovered" is the share of the perplexity lost to pruning that the
run won back: (pruned − after) / (pruned − dense).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import tuili
from tuili.data import calibration_samples, eval_windows, load_text, perplexity
from tuili.data.batches import packed_sequences
from tuili.distill import DistillConfig, distill, student_from_teacher
from tuili.pipeline.report import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prune", default="mlp=0.5", help="structured pruning that makes the student")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5], help="one distillation run per value")
    parser.add_argument("--variant", action="append", default=[],
                        help="another distillation run: attention=mse|kl|cosine or hidden=mse|cosine")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher = tuili.load("default")
    tok = teacher.tokenizer
    calib_text = tok.encode(load_text("builtin", "calibration"))
    train = packed_sequences(calib_text, args.seq_len)
    windows = eval_windows(tok.encode(load_text("builtin", "evaluation")), 512, args.eval_tokens)
    calib = calibration_samples(calib_text, 32, 512, seed=0)

    def ppl(model) -> float:
        return perplexity(model.module, windows, progress=False).perplexity

    dense_ppl = ppl(teacher)
    start = time.perf_counter()
    pruned = student_from_teacher(teacher, args.prune, calib)
    prune_seconds = time.perf_counter() - start
    pruned_ppl = ppl(pruned)
    params = {"dense": teacher.config.num_parameters(), "pruned": pruned.config.num_parameters()}

    base = dict(steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 20),
                batch_size=args.batch_size, eval_every=args.eval_every, checkpoint_every=0)
    runs = [("fine-tuning (labels only)", DistillConfig(**base, alpha=0.0))]
    runs += [(f"distillation (T={args.temperature:g}, α={alpha:g})",
              DistillConfig(**base, alpha=alpha, temperature=args.temperature)) for alpha in args.alpha]
    for variant in args.variant:
        kind, _, loss = variant.partition("=")
        extra = {"attention": {"attention_loss": loss}, "hidden": {"hidden_loss": loss}}[kind]
        runs.append((f"distillation + {kind} {loss}", DistillConfig(**base, alpha=args.alpha[0],
                                                                       temperature=args.temperature, **extra)))
    rows = [["dense teacher", f"{params['dense']:,}", f"{dense_ppl:.3f}", "", "", ""],
            [f"pruned {args.prune} (activation importance, {prune_seconds:.0f} s)", f"{params['pruned']:,}",
             f"{pruned_ppl:.3f}", "0%", "", ""]]
    curves = []
    for name, config in runs:
        student = copy.deepcopy(pruned)
        result = distill(teacher if config.needs_teacher else None, student, train, config, windows)
        after = result.student_perplexity
        recovered = (pruned_ppl - after) / (pruned_ppl - dense_ppl)
        rows.append([f"{name}, {args.steps} steps", f"{params['pruned']:,}", f"{after:.3f}", f"{recovered:.0%}",
                     f"{result.tokens_per_second:.0f}", f"{result.seconds / 60:.1f} min"])
        curves.append((name, [(r["step"], r["student_perplexity"]) for r in result.log if r["student_perplexity"]]))
        print(f"{name}: perplexity {after:.3f} ({recovered:.0%} recovered), "
              f"{result.tokens_per_second:.0f} tok/s, {result.seconds:.0f} s", flush=True)

    tokens = args.steps * args.batch_size * args.seq_len
    print(f"\nTeacher: the default model (fp32, perplexity {dense_ppl:.3f}); training: {train.shape[0]} packed "
          f"sequences of {args.seq_len} tokens from the calibration split, {args.steps} steps × {args.batch_size} "
          f"sequences ({tokens:,} tokens, {tokens / train.numel():.1f} epochs), AdamW lr {args.lr:g} with "
          f"warm-up and cosine decay; perplexity on {windows.numel():,} evaluation tokens.\n")
    print(markdown_table(["model", "parameters", "perplexity", "recovered", "training tok/s", "training time"],
                         rows))
    print("\nPerplexity during training (student, every {} steps):\n".format(args.eval_every))
    steps = [s for s, _ in curves[0][1]]
    print(markdown_table(["run"] + [f"step {s}" for s in steps],
                         [[name] + [f"{p:.3f}" for _, p in curve] for name, curve in curves]))


if __name__ == "__main__":
    main()
