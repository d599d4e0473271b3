"""`tuili prune`: unstructured, N:M or structured pruning, saved."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tuili.cli.common import (
    calib_args,
    load_model,
    model_args,
)
from tuili.prune.methods import METHODS as PRUNE_METHODS
from tuili.prune.methods import method_named


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model's linear layers (unstructured, N:M or structured) and save it")
    model_args(p)
    p.add_argument(
        "--method",
        default="magnitude",
        choices=list(PRUNE_METHODS),
        help="importance for --sparsity / --pattern",
    )
    shape = p.add_mutually_exclusive_group(required=True)
    shape.add_argument("--sparsity", type=float, help="fraction of weights removed (unstructured)")
    shape.add_argument("--pattern", help="N:M semi-structured sparsity, e.g. 2:4")
    shape.add_argument("--structured", help="physically remove parts: mlp=F,experts=F,heads=F,layers=N (any of them)")
    p.add_argument("--scope", default="layer", choices=["layer", "global"], help="--sparsity per layer or over all")
    p.add_argument(
        "--importance", default="activation", help="--structured: neurons l1|l2|activation|taylor, heads l2|activation"
    )
    p.add_argument("--whole-groups", action="store_true", help="--structured heads: remove whole KV groups")
    p.add_argument(
        "--iterations",
        type=int,
        default=1,
        help="--sparsity in this many rising stages with recovery fine-tuning between them",
    )
    p.add_argument("--recovery-steps", type=int, default=20, help="fine-tuning steps after each stage")
    p.add_argument("--ignore", nargs="*", default=["lm_head"], help="layer name patterns left dense")
    calib_args(p)
    p.add_argument("--out", type=Path, help="folder to write the pruned model to")
    p.add_argument("--eval", action="store_true", help="perplexity before and after on the evaluation split")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--report", action="store_true", help="print the per-layer sparsity table")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_prune)


def _prune(args) -> None:
    from tuili.data import calibration_samples, eval_windows, load_text, perplexity
    from tuili.pipeline.analysis import analyze
    from tuili.pipeline.report import sparsity_markdown
    from tuili.prune import SemiStructured, Unstructured, prune_, sparsity_report
    from tuili.prune.config import parse_structured
    from tuili.prune.iterative import iterative_prune_
    from tuili.prune.structured import prune_structured_

    if not args.out and not args.eval and not args.report:
        raise ValueError("give --out DIR to save the pruned model (or --eval / --report to only measure)")
    structured = parse_structured(args.structured) if args.structured else None
    target = None
    if args.sparsity is not None:
        target = Unstructured(args.sparsity, args.scope)
    elif args.pattern:
        target = SemiStructured.parse(args.pattern)
    if args.iterations > 1 and args.sparsity is None:
        raise ValueError("--iterations raises --sparsity in stages; it does not apply to --pattern or --structured")
    model = load_model(args, lazy=True)  # wanda, sparsegpt: one decoder layer read at a time
    calib = calibration_samples(
        model.tokenizer.encode(load_text(args.data, "calibration")), args.calib_samples, args.calib_len, args.seed
    )
    windows = (
        eval_windows(model.tokenizer.encode(load_text("builtin", "evaluation")), args.seq_len, args.eval_tokens)
        if args.eval
        else None
    )
    result: dict = {"method": args.method, "params_before": analyze(model).num_parameters}
    if windows is not None:
        result["perplexity_before"] = perplexity(model.module, windows).perplexity
    start = time.perf_counter()
    if structured:
        result.update(prune_structured_(model, structured, args.importance, calib, args.whole_groups))
    elif args.iterations > 1:
        stages = iterative_prune_(
            model,
            target,
            method_named(args.method),
            args.iterations,
            calib=calib,
            train=calib,
            steps=args.recovery_steps,
            eval_windows=windows,
        )
        result["stages"] = [vars(stage) for stage in stages]
    else:
        prune_(model, target, method_named(args.method), calib=calib, ignore=args.ignore)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["params_after"] = analyze(model).num_parameters
    report = sparsity_report(model.module)
    result["sparsity"] = report.to_dict()
    if windows is not None:
        result["perplexity_after"] = perplexity(model.module, windows).perplexity
    if args.out:
        result["out"] = str(model.save(args.out))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if args.report:
        print(sparsity_markdown(report))
    _summary(result, report.sparsity)


def _summary(result: dict, sparsity: float) -> None:
    """The before/after table and where the model went."""
    from tuili.pipeline.report import markdown_table

    rows = [
        ["parameters", f"{result['params_before']:,}", f"{result['params_after']:,}"],
        ["zeros in linear weights", "", f"{sparsity:.2%}"],
    ]
    if "perplexity_after" in result:
        rows.append(["perplexity", f"{result['perplexity_before']:.4f}", f"{result['perplexity_after']:.4f}"])
    print(markdown_table(["", "before", "after"], rows))
    print(f"pruned in {result['seconds']} s" + (f", saved to {result['out']}" if "out" in result else ""))
