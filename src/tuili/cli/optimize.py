"""`tuili optimize` (the main job), `tuili search` and `tuili recipes`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tuili.cli.common import (
    byte_size,
    data_args,
    load_model,
    model_args,
)
from tuili.errors import TuiliError
from tuili.kernels.kv_format import KV_CACHE_FORMATS
from tuili.prune.methods import METHODS as PRUNE_METHODS
from tuili.quant.config import SCHEMES
from tuili.quant.methods import METHODS as QUANT_METHODS


def add_parser(sub) -> None:
    p = sub.add_parser("optimize", help="the main job: analyze, measure, compress, measure again, report")
    model_args(p)
    data_args(p, max_tokens=16384)
    p.add_argument("--scheme", choices=list(SCHEMES), help="add a quantization stage")
    p.add_argument("--method", default="rtn", choices=list(QUANT_METHODS))
    p.add_argument("--group-size", type=int)
    p.add_argument(
        "--asymmetric",
        action="store_true",
        help="w4a16/w4a8: zero points per group (transformers cannot load these files; default: symmetric)",
    )
    p.add_argument(
        "--lm-head",
        default="float",
        choices=["float", "int8", "same"],
        help="the quantization stage's head: float, int8 weight-only, or the scheme itself",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="float",
        choices=KV_CACHE_FORMATS,
        help="the quantization stage's KV cache: the model's dtype, bf16 (half the bytes) or int8",
    )
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument(
        "--prune",
        metavar="SPEC",
        help="add a pruning stage before quantizing: a sparsity (0.5), a pattern (2:4) or "
        "structured parts (mlp=0.25,heads=0.34,layers=4)",
    )
    p.add_argument("--prune-method", default="wanda", choices=list(PRUNE_METHODS))
    p.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="add a distillation stage after pruning (before quantizing): the model as loaded teaches",
    )
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also measure the output tokens/s of N concurrent requests through the engine",
    )
    p.add_argument(
        "--recipe",
        metavar="NAME|FILE",
        help="run a recipe's stages instead of the flags above: a shipped one (tuili recipes) or a .yaml/.toml file",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=Path("tuili-report"),
        metavar="DIR",
        help="write report.html (tables and plots) and report.md here (default: ./tuili-report)",
    )
    p.add_argument(
        "--no-sensitivity",
        action="store_true",
        help="skip the per-layer sensitivity measurement (the report's sensitivity plot)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.set_defaults(run=_optimize)

    p = sub.add_parser(
        "search", help="choose per-layer int8/int4/float formats and MLP sparsity that meet a budget, apply, measure"
    )
    model_args(p)
    data_args(p, max_tokens=16384)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--max-bytes",
        type=byte_size,
        metavar="B",
        help="weights at most this size: bytes, or with KB/MB/GB (KiB/MiB/GiB)",
    )
    budget.add_argument(
        "--min-speedup", type=float, metavar="S", help="batch-1 decode at least S times the float model's, measured"
    )
    p.add_argument(
        "--max-ppl-increase", type=float, metavar="P", help="perplexity at most P percent above the float model's"
    )
    p.add_argument(
        "--mlp-sparsity",
        type=float,
        nargs="+",
        default=[0.0, 0.125, 0.25],
        metavar="F",
        help="fractions of every MLP's neurons to try removing first (structured), each with its own "
        "plan; the best measured wins (default: 0 0.125 0.25; 0 alone: formats only)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="float",
        choices=KV_CACHE_FORMATS,
        help="the KV cache format every plan gets, measured with it (saved with --out)",
    )
    p.add_argument("--calib-samples", type=int, default=8, help="samples for the sensitivity (one backward pass each)")
    p.add_argument("--out", type=Path, help="save the compressed model here")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.set_defaults(run=_search)

    p = sub.add_parser("recipes", help="list the recipes shipped with tuili (for tuili optimize --recipe)")
    p.set_defaults(run=_recipes)


def _optimize(args) -> None:
    from tuili.pipeline import DistillStage, PruneStage, QuantizeStage, optimize
    from tuili.pipeline.html_report import write_report
    from tuili.pipeline.recipe import load_recipe

    stages = []
    if args.recipe:
        if args.prune or args.distill_steps or args.scheme:
            raise TuiliError("give either --recipe or the stage flags (--prune, --distill-steps, --scheme), not both")
        stages = load_recipe(args.recipe)
    if args.prune:  # before quantizing: pruning works on float linear layers
        stages.append(PruneStage(args.prune, args.prune_method, args.calib_samples, args.seq_len))
    if args.distill_steps:
        stages.append(DistillStage.from_settings({"steps": args.distill_steps, "lr": args.distill_lr}))
    if args.scheme:
        stages.append(
            QuantizeStage(
                args.scheme,
                args.method,
                args.group_size,
                symmetric=not args.asymmetric,
                lm_head=args.lm_head,
                kv_cache=args.kv_cache_dtype,
                calib_samples=args.calib_samples,
                calib_len=args.seq_len,
            )
        )
    report = optimize(
        load_model(args),
        stages,
        data=args.data,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_sizes=args.batch_sizes,
        sensitivity=not args.no_sensitivity,
    )
    page, summary = write_report(report, args.report)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown())
    print(f"report: {page}\nsummary: {summary}", file=sys.stderr)


def _search(args) -> None:
    from tuili.pipeline.search import search

    model, result = search(
        load_model(args),
        max_bytes=args.max_bytes,
        min_speedup=args.min_speedup,
        max_ppl_increase=args.max_ppl_increase,
        data=args.data,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        calib_samples=args.calib_samples,
        mlp_sparsity=args.mlp_sparsity,
        kv_cache=args.kv_cache_dtype,
    )
    if args.out:
        print(f"saved to {model.save(args.out)}", file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_markdown())


def _recipes(args) -> None:
    from tuili.pipeline.recipe import shipped

    for name, recipe in shipped().items():
        print(f"{name}\n    {recipe.description}\n    stages: {', '.join(s.kind for s in recipe.stages)}")
