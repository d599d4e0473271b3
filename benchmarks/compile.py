"""The compile stage's before/after: decode speed of the default model with the eager decode step
and with the compiled one (tuili.engine.compiled), measured in turns in the same run.

    .venv/bin/python benchmarks/compile.py [--schemes fp32 w8a16] [--rounds 5]

Batch 1: a 512-token prompt, 64 new tokens, greedy. 16 concurrent: 16 prompts of 128 tokens,
64 new tokens each, through one engine. Each round times eager then compiled; the table gives
the best of the rounds (the least disturbed on this shared machine) and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tuili
from tuili.engine import LLM, SamplingParams, generate
from tuili.engine.compiled import compile_, uncompile_
from tuili.quant import quantize_, scheme_from_name
from tuili.quant.api import lm_head_plan


def decode_b1(model) -> float:
    prompt = torch.randint(3, model.config.vocab_size, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    return generate(
        model, prompt, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    ).decode_tokens_per_second


def concurrent(model, n: int = 16) -> float:
    g = torch.Generator().manual_seed(n)
    prompts = [torch.randint(3, model.config.vocab_size, (128,), generator=g).tolist() for _ in range(n)]
    llm = LLM(model, max_num_seqs=n, kv_cache_bytes=256 << 20, prefix_caching=False)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    done = llm.generate(prompts, params)
    return sum(len(c.token_ids) for c in done) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["fp32", "w8a16"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for scheme in args.schemes:
        model = tuili.load("default")
        if scheme != "fp32":  # as the shipped recipe: an int8 head too
            ignore, overrides = lm_head_plan("int8")
            quantize_(model, scheme_from_name(scheme, None), ignore=ignore, overrides=overrides, progress=False)
        compiled = compile_(model)
        compiled.warm_up()
        results = {"eager": ([], []), "compiled": ([], [])}
        for _ in range(args.rounds):
            for name in ("eager", "compiled"):
                if name == "eager":
                    uncompile_(model)
                else:
                    compile_(model)
                decode_b1(model)  # warm-up
                results[name][0].append(decode_b1(model))
                results[name][1].append(concurrent(model))
        (eb1, e16), (cb1, c16) = results["eager"], results["compiled"]
        ratio_b1 = statistics.median(c / e for c, e in zip(cb1, eb1))
        ratio_16 = statistics.median(c / e for c, e in zip(c16, e16))
        rows.append(
            [
                scheme,
                f"{compiled.compile_seconds:.0f} s",
                f"{max(eb1):.1f}",
                f"{max(cb1):.1f}",
                f"{ratio_b1:.3f}×",
                f"{max(e16):.1f}",
                f"{max(c16):.1f}",
                f"{ratio_16:.3f}×",
            ]
        )
        uncompile_(model)
    headers = [
        "model",
        "compile time",
        "eager b1 tok/s",
        "compiled b1 tok/s",
        "median ratio b1",
        "eager 16 concurrent",
        "compiled 16 concurrent",
        "median ratio 16",
    ]
    print(
        f"threads: {torch.get_num_threads()}, rounds: {args.rounds} "
        "(best of rounds; ratio: median of per-round ratios)\n"
    )
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
