"""Every quantization scheme × method on the default model, beside fp32, bf16 and the peers, in one run.

    .venv/bin/python benchmarks/quantization.py [--max-tokens 16384] [--calib-samples 64] [--only w4a16]

"+head" rows also quantize lm_head (an int copy of the tied embedding: fp32 is otherwise read in
full every decoded token). Per row: perplexity on the built-in evaluation split (512-token windows),
weight bytes, decode tokens/s at batch 1 (128 tokens after a 32-token prompt) and prefill tokens/s at 512 tokens.
Peers run when installed in the same environment (none is a dependency of tuili):
torch.ao `quantize_dynamic`, torchao 0.18 int8 weight-only, optimum-quanto int8 / int4.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch

import tuili
from tuili.data import builtin_text, calibration_samples, eval_windows, perplexity
from tuili.engine import SamplingParams, generate
from tuili.pipeline.report import human_bytes, markdown_table
from tuili.quant import AWQ, GPTQ, RTN, SmoothQuant, quantize_
from tuili.quant.config import (
    Int4WeightInt8Activation,
    Int4WeightOnly,
    Int8DynamicActivation,
    Int8StaticActivation,
    Int8WeightOnly,
)

CONFIGS = [  # (label, scheme, method, layers left in float or per-layer overrides)
    ("w8a16", Int8WeightOnly(), RTN(), ("lm_head",)),
    ("w8a16", Int8WeightOnly(), GPTQ(), ("lm_head",)),
    ("w8a16 +head", Int8WeightOnly(), RTN(), ()),
    ("w4a16 g32", Int4WeightOnly(group_size=32), RTN(), ("lm_head",)),
    ("w4a16 g64", Int4WeightOnly(group_size=64), RTN(), ("lm_head",)),
    ("w4a16 g64", Int4WeightOnly(group_size=64), GPTQ(), ("lm_head",)),
    ("w4a16 g64", Int4WeightOnly(group_size=64), AWQ(), ("lm_head",)),
    ("w4a16 g64 +head", Int4WeightOnly(group_size=64), AWQ(), ()),
    ("w4a16 g64 +head w8", Int4WeightOnly(group_size=64), GPTQ(), {"lm_head": Int8WeightOnly()}),
    ("w4a16 g128", Int4WeightOnly(group_size=128), RTN(), ("lm_head",)),
    ("w4a16 g128", Int4WeightOnly(group_size=128), GPTQ(), ("lm_head",)),
    ("w4a16 g128", Int4WeightOnly(group_size=128), AWQ(), ("lm_head",)),
    ("w4a8 g64", Int4WeightInt8Activation(group_size=64), RTN(), ("lm_head",)),
    ("w4a8 g64", Int4WeightInt8Activation(group_size=64), GPTQ(), ("lm_head",)),
    ("w4a8 g64 +head w8", Int4WeightInt8Activation(group_size=64), GPTQ(), {"lm_head": Int8WeightOnly()}),
    ("w8a8-dynamic", Int8DynamicActivation(), RTN(), ("lm_head",)),
    ("w8a8-dynamic", Int8DynamicActivation(), SmoothQuant(), ("lm_head",)),
    ("w8a8-dynamic", Int8DynamicActivation(), SmoothQuant(alpha="auto"), ("lm_head",)),
    ("w8a8-dynamic +head", Int8DynamicActivation(), SmoothQuant(), ()),
    ("w8a8-static minmax", Int8StaticActivation(), RTN(), ("lm_head",)),
    ("w8a8-static minmax", Int8StaticActivation(), SmoothQuant(), ("lm_head",)),
    ("w8a8-static minmax", Int8StaticActivation(), SmoothQuant(alpha="auto"), ("lm_head",)),
    ("w8a8-static minmax, gptq weights", Int8StaticActivation(), SmoothQuant(alpha="auto", gptq=True), ("lm_head",)),
    ("w8a8-static mse", Int8StaticActivation("mse"), SmoothQuant(alpha=0.8), ("lm_head",)),
    ("w8a8-static mse", Int8StaticActivation("mse"), SmoothQuant(alpha=0.9), ("lm_head",)),
]


def weight_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen and t.device.type != "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def speed(model, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill tok/s at len(prompt), decode tok/s at batch 1): best of `repeats`."""
    ids = torch.tensor([prompt])
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    with torch.no_grad():
        model.module(ids[:, :16], last_only=True)
        prefill = max(len(prompt) / _time(lambda: model.module(ids, last_only=True)) for _ in range(repeats))
    decode = max(generate(model, prompt[:32], params).decode_tokens_per_second for _ in range(repeats))
    return prefill, decode


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peer_rows(windows, prompt, args):
    """Peers on tuili's own fp32 model (same weights, same windows): they quantize its nn.Linears."""
    peers = []

    def ao_dynamic(m):
        return torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)

    peers.append(("torch.ao quantize_dynamic int8", ao_dynamic, torch.inference_mode))
    with contextlib.suppress(ImportError):
        from torchao.quantization import Int8WeightOnlyConfig
        from torchao.quantization import quantize_ as ao_quantize_

        def torchao_int8(m):
            ao_quantize_(
                m,
                Int8WeightOnlyConfig(),
                filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and name != "lm_head",
            )
            return m

        peers.append(("torchao 0.18 int8 weight-only", torchao_int8, torch.inference_mode))
    with contextlib.suppress(ImportError):
        from optimum.quanto import freeze, qint4, qint8, quantize

        def quanto(weights):
            def apply(m):
                quantize(m, weights=weights, exclude=["lm_head"])
                freeze(m)
                return m

            return apply

        peers.append(("optimum-quanto int8", quanto(qint8), torch.no_grad))
        peers.append(("optimum-quanto int4 g128", quanto(qint4), torch.no_grad))  # quanto refuses inference_mode
    rows = []
    for name, apply, mode in peers:
        model = tuili.load("default")
        try:
            with mode():
                model.module = apply(model.module)
                ppl = perplexity(model.module, windows, progress=False).perplexity
        except Exception as e:  # a peer that fails on this machine is reported, not fatal
            rows.append((name, f"failed: {type(e).__name__}: {str(e)[:60]}", 0, float("nan"), 0, 0, 0.0))
            continue

        pre, dec = speed(model, prompt, args.new_tokens, args.repeats)
        # peers keep packed weights in C++ objects or tensor subclasses that no tensor count sees
        rows.append((name, "", 0, ppl, pre, dec, 0.0))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", nargs="+", help="run only the configs whose label starts with one of these")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()

    base = tuili.load("default")
    tok = base.tokenizer
    windows = eval_windows(tok.encode(builtin_text("evaluation")), 512, args.max_tokens)
    calib = calibration_samples(tok.encode(builtin_text("calibration")), args.calib_samples, 512, seed=0)
    prompt = tok.encode(builtin_text("evaluation"))[:512]

    rows = []
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = tuili.load("default", dtype=dtype)
        ppl = perplexity(model.module, windows, progress=False).perplexity
        rows.append(
            (label, "", weight_bytes(model.module), ppl, *speed(model, prompt, args.new_tokens, args.repeats), 0.0)
        )
        print(rows[-1], flush=True)
    for label, scheme, method, layers in CONFIGS:
        if args.only and not label.startswith(tuple(args.only)):
            continue
        model = copy.deepcopy(base)
        start = time.perf_counter()
        # `layers`: names left in float, or a dict of per-layer overrides (then nothing stays float)
        ignore, overrides = (layers, None) if isinstance(layers, tuple) else ((), layers)
        quantize_(model, scheme, method, calib=calib, ignore=ignore, overrides=overrides, progress=False)
        seconds = time.perf_counter() - start
        ppl = perplexity(model.module, windows, progress=False).perplexity
        name = method.name + (f" α={method.alpha}" if isinstance(method, SmoothQuant) else "")
        rows.append(
            (
                f"tuili {label}",
                name,
                weight_bytes(model.module),
                ppl,
                *speed(model, prompt, args.new_tokens, args.repeats),
                seconds,
            )
        )
        print(rows[-1], flush=True)
    if not args.no_peers:
        rows += peer_rows(windows, prompt, args)

    fp32 = rows[0]
    print(
        f"\nSmolLM2-135M-Instruct, {windows.numel():,} tokens in 512-token windows, calibration "
        f"{args.calib_samples} × 512, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print(
        markdown_table(
            [
                "model",
                "method",
                "weights",
                "perplexity",
                "vs fp32",
                "prefill tok/s",
                "decode tok/s",
                "decode vs fp32",
                "quantize time",
            ],
            [
                [
                    name,
                    method,
                    human_bytes(b) if b else "",
                    f"{ppl:.3f}",
                    f"{100 * (ppl / fp32[3] - 1):+.2f}%",
                    f"{pre:.0f}",
                    f"{dec:.1f}",
                    f"{dec / fp32[5]:.2f}×",
                    f"{sec:.0f} s" if sec else "",
                ]
                for name, method, b, ppl, pre, dec, sec in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
