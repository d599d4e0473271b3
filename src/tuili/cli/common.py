"""What the commands share: model, data, calibration and sampling options, and loading."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', an HF folder, a .gguf file or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: all cores)")
    p.add_argument(
        "--keep-quantized",
        action="store_true",
        help="a .gguf file's quantized layers run from their own codes (Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0) "
        "instead of being dequantized to --dtype",
    )


def data_args(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    p.add_argument(
        "--data",
        default="builtin",
        help="'builtin' (CPython docs, evaluation split), a text file, a .jsonl[:FIELD] file or hf:NAME",
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="score at most this many tokens")


def calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="builtin", help="calibration text ('builtin' uses its calibration split)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)


def sampling_args(p: argparse.ArgumentParser) -> None:
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


def load_model(args, lazy: bool = False):
    """The model `--model` names; `lazy`: decoder layers read as a layer-by-layer verb reaches them."""
    from tuili.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model = load(args.model, dtype=args.dtype, keep_quantized=getattr(args, "keep_quantized", False), lazy=lazy)
    print(f"loaded {model.config.architecture} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model


def sampling_params(args):
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


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def byte_size(text: str) -> int:
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
