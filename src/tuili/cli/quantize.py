"""`tuili quantize`: quantize a model's linear layers and save it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tuili.cli.common import (
    alpha,
    calib_args,
    load_model,
    model_args,
)
from tuili.errors import TuiliError
from tuili.kernels.kv_format import KV_CACHE_FORMATS
from tuili.quant.config import SCHEMES
from tuili.quant.methods import METHODS as QUANT_METHODS


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's linear layers and save it (compressed-tensors)")
    model_args(p)
    p.add_argument("--scheme", required=True, choices=list(SCHEMES))
    p.add_argument("--method", default="rtn", choices=list(QUANT_METHODS))
    p.add_argument("--group-size", type=int, help="weights per scale along the input (w4a16, w4a8: default 128)")
    p.add_argument(
        "--asymmetric",
        action="store_true",
        help="w4a16/w4a8: zero points per group (transformers cannot load these files; default: symmetric)",
    )
    p.add_argument("--ignore", nargs="*", default=["lm_head"], help="layer name patterns left in float")
    p.add_argument(
        "--lm-head",
        default="float",
        choices=["float", "int8", "same"],
        help="the language-model head: keep it float (the field's default), int8 weight-only "
        "(decoding reads it every token: the fastest trade), or the scheme itself",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="float",
        choices=KV_CACHE_FORMATS,
        help="what the saved model's KV cache stores: its dtype, bf16 (half the bytes) or int8",
    )
    p.add_argument("--observer", default="minmax", help="w8a8-static: minmax, moving-average, percentile, mse, entropy")
    p.add_argument(
        "--alpha",
        type=alpha,
        default=0.5,
        help="smoothquant: migration strength in [0, 1], or 'auto' to search it per layer group",
    )
    p.add_argument(
        "--gptq",
        action="store_true",
        help="smoothquant: round the smoothed int8 weights with GPTQ (w8a8-static reaches +1.4%% "
        "perplexity with --alpha auto on the default model)",
    )
    calib_args(p)
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


def _quantize(args) -> None:
    from tuili.data import calibration_samples, eval_windows, load_text, perplexity
    from tuili.pipeline.analysis import analyze
    from tuili.pipeline.report import human_bytes, markdown_table
    from tuili.quant import Int8StaticActivation, SmoothQuant, quantize_, quantize_kv_cache_, scheme_from_name
    from tuili.quant.api import lm_head_plan
    from tuili.quant.methods import method_named
    from tuili.quant.sensitivity import layer_errors

    if not args.out and not args.analyze:
        raise ValueError("give --out DIR to save the quantized model (or --analyze for the error analysis only)")
    scheme = scheme_from_name(args.scheme, args.group_size, not args.asymmetric)
    if scheme.static:
        scheme = Int8StaticActivation(args.observer)
    if args.gptq and args.method != "smoothquant":
        raise TuiliError(
            "--gptq rounds SmoothQuant's smoothed weights: use it with --method smoothquant "
            "(--method gptq is GPTQ on its own, for w4a16/w8a16/w4a8)"
        )
    method = SmoothQuant(args.alpha, gptq=args.gptq) if args.method == "smoothquant" else method_named(args.method)
    model = load_model(args, lazy=True)  # one float decoder layer in memory at a time
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
        rows = layer_errors(model, scheme, calib[:8], short, ignore=tuple(args.ignore))
        result["layers"] = [r.to_dict() for r in rows]
        if not args.json:
            print(_layer_table(rows))
    if args.out:
        before_bytes = analyze(model).num_bytes
        if args.eval:
            result["perplexity_before"] = perplexity(model.module, windows).perplexity
        start = time.perf_counter()
        ignore, overrides = lm_head_plan(args.lm_head, args.ignore)
        quantize_(model, scheme, method, calib=calib, ignore=ignore, overrides=overrides)
        quantize_kv_cache_(model, args.kv_cache_dtype)
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


def _layer_table(rows) -> str:
    """`--analyze`'s table: each layer's errors when it alone is quantized, most sensitive first."""
    from tuili.pipeline.report import markdown_table

    headers = ["layer", "weight SQNR (dB)", "output SQNR (dB)", "output MSE", "Δ perplexity"]
    cells = [
        [r.name, f"{r.weight_sqnr:.1f}", f"{r.output_sqnr:.1f}", f"{r.output_mse:.3g}", f"{r.perplexity_delta:+.4f}"]
        for r in rows
    ]
    return markdown_table(headers, cells)
