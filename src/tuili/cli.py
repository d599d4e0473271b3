"""The `tuili` command line: parse arguments, call the packages, print. No logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from tuili.errors import TuiliError
from tuili.quant.config import SCHEMES


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (TuiliError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuili", description="Make language models smaller and faster, and measure it."
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("optimize", help="the main job: analyze, measure, compress, measure again, report")
    _model_args(p)
    _data_args(p, max_tokens=16384)
    p.add_argument("--scheme", choices=list(SCHEMES), help="add a quantization stage")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq", "smoothquant"])
    p.add_argument("--group-size", type=int)
    p.add_argument(
        "--lm-head",
        default="float",
        choices=["float", "int8", "same"],
        help="the quantization stage's head: float, int8 weight-only, or the scheme itself",
    )
    p.add_argument(
        "--kv-cache",
        default="float",
        choices=["float", "bfloat16", "int8"],
        help="the quantization stage's KV cache: the model's dtype, bf16 (half the bytes) or int8",
    )
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument(
        "--prune",
        metavar="SPEC",
        help="add a pruning stage before quantizing: a sparsity (0.5), a pattern (2:4) or "
        "structured parts (mlp=0.25,heads=0.34,layers=4)",
    )
    p.add_argument("--prune-method", default="wanda", choices=["magnitude", "taylor", "wanda", "sparsegpt"])
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
    _model_args(p)
    _data_args(p, max_tokens=16384)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--max-bytes",
        type=_byte_size,
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
        "--kv-cache",
        default="float",
        choices=["float", "bfloat16", "int8"],
        help="the KV cache format every plan gets, measured with it (saved with --out)",
    )
    p.add_argument("--calib-samples", type=int, default=8, help="samples for the sensitivity (one backward pass each)")
    p.add_argument("--out", type=Path, help="save the compressed model here")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.set_defaults(run=_search)

    p = sub.add_parser("recipes", help="list the recipes shipped with tuili (for tuili optimize --recipe)")
    p.set_defaults(run=_recipes)

    p = sub.add_parser("export", help="export a model (float or quantized) to ONNX or GGUF and check it")
    _model_args(p)
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the .onnx or .gguf file to write (atomically); the suffix picks the format",
    )
    p.add_argument("--gguf-float", default="f16", choices=["f16", "f32"], help="GGUF: the type of float weights")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check (ONNX: run in onnxruntime; GGUF: read back and compare logits)",
    )
    p.set_defaults(run=_export)

    p = sub.add_parser("quantize", help="quantize a model's linear layers and save it (compressed-tensors)")
    _model_args(p)
    p.add_argument("--scheme", required=True, choices=list(SCHEMES))
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq", "smoothquant"])
    p.add_argument("--group-size", type=int, help="weights per scale along the input (w4a16, w4a8: default 128)")
    p.add_argument("--exclude", nargs="*", default=["lm_head"], help="layer name patterns left in float")
    p.add_argument(
        "--lm-head",
        default="float",
        choices=["float", "int8", "same"],
        help="the language-model head: keep it float (the field's default), int8 weight-only "
        "(decoding reads it every token: the fastest trade), or the scheme itself",
    )
    p.add_argument(
        "--kv-cache",
        default="float",
        choices=["float", "bfloat16", "int8"],
        help="what the saved model's KV cache stores: its dtype, bf16 (half the bytes) or int8",
    )
    p.add_argument("--observer", default="minmax", help="w8a8-static: minmax, moving-average, percentile, mse, entropy")
    p.add_argument(
        "--alpha",
        type=_alpha,
        default=0.5,
        help="smoothquant: migration strength in [0, 1], or 'auto' to search it per layer group",
    )
    p.add_argument(
        "--gptq",
        action="store_true",
        help="smoothquant: round the smoothed int8 weights with GPTQ (w8a8-static reaches +1.4%% "
        "perplexity with --alpha auto on the default model)",
    )
    _calib_args(p)
    p.add_argument("--out", type=Path, help="folder to write the quantized model to")
    p.add_argument("--eval", action="store_true", help="perplexity before and after on the evaluation split")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    p.add_argument(
        "--analyze",
        action="store_true",
        help="per-layer error analysis: weight SQNR, output error, perplexity sensitivity",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_quantize)

    p = sub.add_parser("prune", help="prune a model's linear layers (unstructured, N:M or structured) and save it")
    _model_args(p)
    p.add_argument(
        "--method",
        default="magnitude",
        choices=["magnitude", "taylor", "wanda", "sparsegpt"],
        help="importance for --sparsity / --pattern",
    )
    shape = p.add_mutually_exclusive_group(required=True)
    shape.add_argument("--sparsity", type=float, help="fraction of weights removed (unstructured)")
    shape.add_argument("--pattern", help="N:M semi-structured sparsity, e.g. 2:4")
    shape.add_argument("--structured", help="physically remove parts: mlp=F,heads=F,layers=N (any of them)")
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
    p.add_argument("--exclude", nargs="*", default=["lm_head"], help="layer name patterns left dense")
    _calib_args(p)
    p.add_argument("--out", type=Path, help="folder to write the pruned model to")
    p.add_argument("--eval", action="store_true", help="perplexity before and after on the evaluation split")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--report", action="store_true", help="print the per-layer sparsity table")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_prune)

    p = sub.add_parser("distill", help="train a smaller student from a teacher (logits, attention, hidden states)")
    p.add_argument("--teacher", default="default", help="'default', an HF folder, a .gguf file or a hub id")
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--student", help="a model spec, or sizes cut from the teacher: layers=N,mlp=M")
    student.add_argument("--prune", metavar="SPEC", help="the teacher, structurally pruned: mlp=F,heads=F,layers=N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights (master copy)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: all cores)")
    p.add_argument("--data", default="builtin", help="training text ('builtin' uses its calibration split)")
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_distill)

    p = sub.add_parser("eval", help="perplexity over non-overlapping token windows")
    _model_args(p)
    _data_args(p, max_tokens=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_eval)

    p = sub.add_parser("analyze", help="parameters, bytes, FLOPs per token and memory")
    _model_args(p)
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_analyze)

    p = sub.add_parser("generate", help="complete a prompt, streaming tokens to the terminal")
    p.add_argument("prompt")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.set_defaults(run=_generate)

    p = sub.add_parser("chat", help="talk to the model, multi-turn (empty line or Ctrl-D ends)")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--system", help="a system message to start the conversation")
    p.set_defaults(run=_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, embeddings, metrics)")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        help="a name clients send as 'model' (repeat for aliases; default: the --model spec)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TUILI_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $TUILI_API_KEY; none if unset)",
    )
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoding together")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step")
    p.add_argument("--kv-cache-gb", type=float, help="KV-cache memory (default: 2,048 tokens per sequence)")
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "float32", "bfloat16", "int8"),
        default="auto",
        help="what the KV cache stores (auto: the model's choice, saved by a recipe's kv_cache, else its dtype)",
    )
    p.add_argument("--max-prompt-tokens", type=int, help="refuse longer prompts (400)")
    p.add_argument("--max-tokens", type=int, help="refuse requests asking for more tokens (400)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="refuse larger request bodies (413)")
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="sequences running or waiting at once; beyond it 429 with Retry-After",
    )
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a generation may run before it is stopped (504; 0: no limit)",
    )
    p.add_argument("--no-warmup", action="store_true", help="report ready at once (the first requests are slower)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=_serve)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', an HF folder, a .gguf file or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: all cores)")


def _data_args(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    p.add_argument(
        "--data",
        default="builtin",
        help="'builtin' (CPython docs, evaluation split), a text file, a .jsonl[:FIELD] file or hf:NAME",
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="score at most this many tokens")


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="builtin", help="calibration text ('builtin' uses its calibration split)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeat for several)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "float32", "bfloat16", "int8"),
        default="auto",
        help="what the KV cache stores (auto: the model's choice, saved by a recipe's kv_cache, else its dtype)",
    )


def _load(args):
    from tuili.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model = load(args.model, dtype=args.dtype)
    print(f"loaded {model.config.architecture} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model


def _params(args):
    from tuili.engine import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
    )


def _optimize(args) -> None:
    from tuili.pipeline import distill_stage, optimize, prune_stage, quantize_stage
    from tuili.pipeline.html_report import write_report
    from tuili.pipeline.recipe import load_recipe

    stages = []
    if args.recipe:
        if args.prune or args.distill_steps or args.scheme:
            raise TuiliError("give either --recipe or the stage flags (--prune, --distill-steps, --scheme), not both")
        stages = load_recipe(args.recipe)
    if args.prune:  # before quantizing: pruning works on float linear layers
        stages.append(prune_stage(args.prune, args.prune_method, args.data, args.calib_samples, args.seq_len))
    if args.distill_steps:
        stages.append(distill_stage(args.distill_steps, data=args.data, lr=args.distill_lr))
    if args.scheme:
        stages.append(
            quantize_stage(
                args.scheme,
                args.method,
                args.group_size,
                args.data,
                args.calib_samples,
                args.seq_len,
                args.lm_head,
                args.kv_cache,
            )
        )
    report = optimize(
        _load(args),
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


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _byte_size(text: str) -> int:
    """'200MiB', '0.2 GB', '209715200' -> bytes."""
    number = text.strip().rstrip("BbIiKkMmGg ")
    unit = text.strip()[len(number) :].strip().lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"a size is a number of bytes, optionally with KB, MB, GB, KiB, MiB or GiB (200MiB), got {text!r}"
        ) from None
    return int(value)


def _search(args) -> None:
    from tuili.pipeline.search import search

    model, result = search(
        _load(args),
        max_bytes=args.max_bytes,
        min_speedup=args.min_speedup,
        max_ppl_increase=args.max_ppl_increase,
        data=args.data,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        calib_samples=args.calib_samples,
        mlp_sparsity=args.mlp_sparsity,
        kv_cache=args.kv_cache,
    )
    if args.out:
        print(f"saved to {model.save(args.out)}", file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_markdown())


def _recipes(args) -> None:
    from tuili.pipeline.recipe import shipped

    for name, recipe in shipped().items():
        print(f"{name}\n    {recipe.description}\n    stages: {', '.join(s.kind for s in recipe.stages)}")


def _export(args) -> None:
    from tuili.pipeline.export import export_onnx
    from tuili.pipeline.gguf_export import export_gguf

    if args.out.suffix not in (".onnx", ".gguf"):
        raise TuiliError(f"--out must name a .onnx or .gguf file, got {args.out}")
    model = _load(args)
    start = time.perf_counter()
    if args.out.suffix == ".gguf":
        written = export_gguf(model, args.out, args.gguf_float, check=not args.no_check)
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(written.tensor_types.items()))
        detail, what, notes = f"; tensors: {kinds}", "the GGUF file read back", []
        if written.dequantized:
            notes.append(
                f"{len(written.dequantized)} quantized layers have no GGUF block type of their format "
                f"and were written dequantized (F16): {', '.join(written.dequantized[:3])}, ..."
            )
    else:
        written = export_onnx(model, args.out, check=not args.no_check)
        detail, what, notes = "", "onnxruntime", []
    path = written.path
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB{detail}) in {time.perf_counter() - start:.1f} s")
    print(*notes, sep="\n", end="\n" if notes else "")
    if written.max_abs_diff is not None:
        print(f"logits of {what} vs tuili's, 2 × 32 tokens: max abs diff {written.max_abs_diff:.2e}")


def _quantize(args) -> None:
    from tuili.data import calibration_samples, eval_windows, load_text, perplexity
    from tuili.pipeline.analysis import analyze
    from tuili.pipeline.report import human_bytes, markdown_table
    from tuili.quant import (
        METHODS,
        Int8StaticActivation,
        SmoothQuant,
        quantize_,
        quantize_kv_cache_,
        scheme_from_name,
    )
    from tuili.quant.api import lm_head_plan
    from tuili.quant.sensitivity import layer_errors

    if not args.out and not args.analyze:
        raise ValueError("give --out DIR to save the quantized model (or --analyze for the error analysis only)")
    scheme = scheme_from_name(args.scheme, args.group_size)
    if isinstance(scheme, Int8StaticActivation):
        scheme = Int8StaticActivation(args.observer)
    if args.gptq and args.method != "smoothquant":
        raise TuiliError(
            "--gptq rounds SmoothQuant's smoothed weights: use it with --method smoothquant "
            "(--method gptq is GPTQ on its own, for w4a16/w8a16/w4a8)"
        )
    method = SmoothQuant(args.alpha, gptq=args.gptq) if args.method == "smoothquant" else METHODS[args.method]()
    model = _load(args)
    calib = calibration_samples(
        model.tokenizer.encode(load_text(args.data, "calibration")), args.calib_samples, args.calib_len, args.seed
    )
    windows = None
    if args.eval or args.analyze:
        windows = eval_windows(
            model.tokenizer.encode(load_text("builtin", "evaluation")), args.seq_len, args.eval_tokens
        )
    result: dict = {"scheme": args.scheme, "method": args.method}
    if args.analyze:
        short = windows[:2]  # sensitivity: a short evaluation per layer
        rows = layer_errors(model, scheme, calib[:8], short, ignore=tuple(args.exclude))
        result["layers"] = [r.to_dict() for r in rows]
        if not args.json:
            print(
                markdown_table(
                    ["layer", "weight SQNR (dB)", "output SQNR (dB)", "output MSE", "Δ perplexity"],
                    [
                        [
                            r.name,
                            f"{r.weight_sqnr:.1f}",
                            f"{r.output_sqnr:.1f}",
                            f"{r.output_mse:.3g}",
                            f"{r.perplexity_delta:+.4f}",
                        ]
                        for r in rows
                    ],
                )
            )
    if args.out:
        before_bytes = analyze(model).num_bytes
        if args.eval:
            result["perplexity_before"] = perplexity(model.module, windows).perplexity
        start = time.perf_counter()
        ignore, overrides = lm_head_plan(args.lm_head, args.exclude)
        quantize_(model, scheme, method, calib=calib, ignore=ignore, overrides=overrides)
        quantize_kv_cache_(model, args.kv_cache)
        result["seconds"] = round(time.perf_counter() - start, 1)
        if args.eval:
            result["perplexity_after"] = perplexity(model.module, windows).perplexity
        result.update(bytes_before=before_bytes, bytes_after=analyze(model).num_bytes, out=str(model.save(args.out)))
        if not args.json:
            rows = [["weights", human_bytes(before_bytes), human_bytes(result["bytes_after"])]]
            if args.eval:
                rows.append(["perplexity", f"{result['perplexity_before']:.4f}", f"{result['perplexity_after']:.4f}"])
            print(markdown_table(["", "before", f"after {args.scheme} {args.method}"], rows))
            print(f"quantized in {result['seconds']} s, saved to {result['out']}")
    if args.json:
        print(json.dumps(result, indent=2))


def _distill(args) -> None:
    from tuili.data import calibration_samples, eval_windows, load_text
    from tuili.data.batches import packed_sequences
    from tuili.distill import (
        DistillConfig,
        Distiller,
        student_from_sizes,
        student_from_teacher,
    )
    from tuili.distill.students import parse_sizes
    from tuili.distill.trainer import init_distributed
    from tuili.models import load
    from tuili.models.io import atomic_write_text
    from tuili.pipeline.report import markdown_table

    config = DistillConfig(
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
    rank, _ = init_distributed()
    run_dir = args.run_dir or args.out.with_name(args.out.name + ".run")
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = _load(argparse.Namespace(model=args.teacher, dtype=args.dtype, threads=None))
    tok = teacher.tokenizer
    train_text = tok.encode(load_text(args.data, "calibration"))
    if args.prune or (args.student and "=" in args.student):
        calib = calibration_samples(train_text, args.calib_samples, min(512, len(train_text)), args.seed)
        if args.prune:
            student = student_from_teacher(teacher, args.prune, calib, args.importance)
        else:
            student = student_from_sizes(teacher, **parse_sizes(args.student), calib=calib)
    else:
        student = load(args.student, dtype=args.dtype)
    train = packed_sequences(train_text, args.seq_len)
    windows = eval_windows(tok.encode(load_text(args.eval_data, "evaluation")), 512, args.eval_tokens)
    trainer = Distiller(teacher, student, train, config, windows, run_dir, args.resume)
    if rank == 0 and trainer.align is not None:
        print(
            f"student layer i stands for teacher layer {list(trainer.align.layers)} ({trainer.align.source})",
            file=sys.stderr,
        )
    result = trainer.train()
    if rank != 0:
        return
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


def _eval(args) -> None:
    from tuili.data import eval_windows, load_text, perplexity

    model = _load(args)
    windows = eval_windows(model.tokenizer.encode(load_text(args.data, "evaluation")), args.seq_len, args.max_tokens)
    result = perplexity(model.module, windows, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": model.source, "data": args.data, **result.to_dict()}, indent=2))
        return
    print(
        f"perplexity {result.perplexity:.4f} over {result.num_tokens:,} tokens "
        f"({result.num_windows} windows of {result.seq_len}) in {result.seconds:.1f} s, "
        f"{result.tokens_per_second:.0f} tokens/s"
    )


def _analyze(args) -> None:
    from tuili.pipeline.analysis import analysis_markdown, analyze

    result = analyze(_load(args), context_len=args.context_len, batch_size=args.batch_size)
    print(json.dumps(result.to_dict(), indent=2) if args.json else analysis_markdown(result))


def _generate(args) -> None:
    from tuili.engine import LLM

    llm = LLM(_load(args), max_num_seqs=1, kv_cache_dtype=args.kv_cache_dtype)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    _print_stream(llm, prompt, _params(args))


def _chat(args) -> None:
    from tuili.engine import LLM

    llm = LLM(_load(args), max_num_seqs=1, kv_cache_dtype=args.kv_cache_dtype)  # one engine: earlier turns stay cached
    messages = [{"role": "system", "content": args.system}] if args.system else []
    params = _params(args)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print()
            return
        if not user.strip():
            return
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": _print_stream(llm, messages, params)})


def _print_stream(llm, prompt, params) -> str:
    """Stream a completion to stdout; its speed to stderr. Returns the text."""
    start, first, pieces = time.perf_counter(), None, []
    for delta in llm.stream(prompt, params):
        first = first or time.perf_counter()
        pieces.append(delta)
        print(delta, end="", flush=True)
    print()
    stats = llm.engine.stats()
    if first is not None:
        print(
            f"[first text after {1000 * (first - start):.0f} ms, {time.perf_counter() - start:.1f} s in all; "
            f"prefix cache hit rate {stats['prefix_cache_hits'] / max(1, stats['prefix_cache_queries']):.0%}]",
            file=sys.stderr,
        )
    return "".join(pieces)


def _serve(args) -> int:
    from tuili.server import ServerConfig, build_server, serve

    for name, value in (
        ("--port", args.port),
        ("--max-num-seqs", args.max_num_seqs),
        ("--max-queued-requests", args.max_queued_requests),
    ):
        if value < (0 if name == "--port" else 1):
            raise ValueError(f"{name} must be positive, got {value}")
    if not args.request_timeout >= 0:
        raise ValueError(f"--request-timeout must be 0 (no limit) or a number of seconds, got {args.request_timeout}")
    config = ServerConfig(
        model_names=tuple(args.served_model_name) or (args.model,),
        api_key=args.api_key or None,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_queued_requests=args.max_queued_requests,
        warmup=not args.no_warmup,
        request_timeout=args.request_timeout or None,
    )
    kv_bytes = int(args.kv_cache_gb * (1 << 30)) if args.kv_cache_gb else None
    server = build_server(
        _load(args),
        config,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_bytes=kv_bytes,
        kv_cache_dtype=args.kv_cache_dtype,
        threads=args.threads,
    )
    return serve(server, args.host, args.port, args.grace, args.log_level)


def _prune(args) -> None:
    from tuili.data import calibration_samples, eval_windows, load_text, perplexity
    from tuili.pipeline.analysis import analyze
    from tuili.pipeline.report import markdown_table, sparsity_markdown
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
    model = _load(args)
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
            args.method,
            args.iterations,
            calib=calib,
            train=calib,
            steps=args.recovery_steps,
            eval_windows=windows,
        )
        result["stages"] = [vars(stage) for stage in stages]
    else:
        prune_(model, target, args.method, calib=calib, ignore=args.exclude)
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
    rows = [
        ["parameters", f"{result['params_before']:,}", f"{result['params_after']:,}"],
        ["zeros in linear weights", "", f"{report.sparsity:.2%}"],
    ]
    if windows is not None:
        rows.append(["perplexity", f"{result['perplexity_before']:.4f}", f"{result['perplexity_after']:.4f}"])
    print(markdown_table(["", "before", "after"], rows))
    print(f"pruned in {result['seconds']} s" + (f", saved to {result['out']}" if args.out else ""))


if __name__ == "__main__":
    sys.exit(main())
