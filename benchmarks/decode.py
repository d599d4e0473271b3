"""Batch-1 decode of the default model: fp32 against the w8a16 recipe's model, each through the
engine's C++ decode step and its Python loop, timed in turns within one process.

    .venv/bin/python benchmarks/decode.py [--rounds 5] [--new-tokens 64] [--prompt-tokens 512]

Each round times all four (model × step) once, in the same order; the table gives each one's
median tokens/s over the rounds and the median of the per-round ratios, so that this shared
machine's drifts (its memory bus is what the fp32 model waits on) hit both sides of a ratio alike.
The w8a16 model is what `tuili optimize --recipe w8a16` makes: int8 weights per channel (round to
nearest), an int8 head and a bf16 KV cache.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
from datetime import date

import torch

import tuili
from tuili.engine.fused import python_decode
from tuili.engine.generate import generate
from tuili.engine.sampling import SamplingParams
from tuili.pipeline.report import markdown_table
from tuili.quant import Int8WeightOnly, quantize_
from tuili.quant.kv import quantize_kv_cache_


def w8a16(model):
    """The w8a16 recipe's quantize stage."""
    model = copy.deepcopy(model)
    quantize_(model, Int8WeightOnly(), ignore=(), progress=False)
    quantize_kv_cache_(model, "bfloat16")
    return model


def decode_rate(model, prompt: list[int], new_tokens: int, python: bool) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    if python:
        with python_decode():
            return generate(model, prompt, params).decode_tokens_per_second
    return generate(model, prompt, params).decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    args = parser.parse_args()
    fp32 = tuili.load()
    models = {"fp32": fp32, "w8a16": w8a16(fp32)}
    vocab = fp32.config.vocab_size
    prompt = torch.randint(3, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = [(name, python) for name in models for python in (False, True)]
    for name, python in runs:  # warm-up: kernels packed, plans built
        decode_rate(models[name], prompt[:16], 4, python)
    rates: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    for _ in range(args.rounds):
        for name, python in runs:
            rates[(name, python)].append(decode_rate(models[name], prompt, args.new_tokens, python))

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    median = {run: statistics.median(r) for run, r in rates.items()}
    rows = []
    for python in (False, True):
        step = "Python loop" if python else "C++ step"
        rows.append(
            [
                step,
                f"{median[('fp32', python)]:.1f}",
                f"{median[('w8a16', python)]:.1f}",
                f"{ratio(('w8a16', python), ('fp32', python)):.2f}×",
                f"{min(x / y for x, y in zip(rates[('w8a16', python)], rates[('fp32', python)])):.2f}×",
            ]
        )
    print(
        f"{date.today()} · {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens\n"
    )
    print(
        markdown_table(
            ["decode step", "fp32 tok/s", "w8a16 tok/s", "w8a16 vs fp32 (median of rounds)", "lowest round"], rows
        )
    )
    print()
    print(
        markdown_table(
            ["model", "C++ step vs Python loop (median of rounds)"],
            [[name, f"{ratio((name, False), (name, True)):.2f}×"] for name in models],
        )
    )
    print()
    print(
        markdown_table(
            ["model × step", *[f"round {i + 1}" for i in range(args.rounds)]],
            [
                [f"{name}, {'Python' if python else 'C++'}", *[f"{r:.1f}" for r in rates[(name, python)]]]
                for name, python in runs
            ],
        )
    )


if __name__ == "__main__":
    main()
