"""Batch-1 decode of the default model, fp32 (or bf16) and three quantized forms, through the engine's
C++ decode step and through the model's module forward, timed in turns within one process.

    .venv/bin/python benchmarks/decode.py [--rounds 5] [--new-tokens 64] [--prompt-tokens 512]
                                          [--models fp32 bf16 w8a16 w4a16 w8a8]

Each round times every (model × step) once, in the same order; the table gives each one's median
tokens/s over the rounds and the median of the per-round ratios, so that this shared machine's
drifts hit both sides of a ratio alike. It uses only the public API (`tuili.LLM(...,
fast_decode=...)`), so it runs unchanged against an older checkout on PYTHONPATH: that is how
before/after comparisons are made. w8a16 is what `tuili optimize --recipe w8a16` makes (int8
weights per channel, an int8 head, a bf16 KV cache); w4a16 is 4-bit weights in groups of 32; w8a8
is int8 weights and per-token int8 activations.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
from datetime import date

import torch

import tuili
from tuili.engine import LLM, SamplingParams
from tuili.pipeline.report import markdown_table
from tuili.quant import Int4WeightOnly, Int8DynamicActivation, Int8WeightOnly, quantize_
from tuili.quant.kv import quantize_kv_cache_

SCHEMES = {
    "fp32": None,
    "bf16": None,  # the model's weights cast to bf16
    "w8a16": Int8WeightOnly(),
    "w4a16": Int4WeightOnly(group_size=32),
    "w8a8": Int8DynamicActivation(),
}


def quantized(model, name: str):
    if name == "bf16":
        bf16 = copy.deepcopy(model)
        bf16.module.to(torch.bfloat16)
        return bf16
    if SCHEMES[name] is None:
        return model
    model = copy.deepcopy(model)
    quantize_(model, SCHEMES[name], ignore=(), progress=False)
    if name == "w8a16":
        quantize_kv_cache_(model, "bfloat16")
    return model


def decode_rate(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return llm.generate([prompt], params)[0].decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--models", nargs="+", choices=list(SCHEMES), default=["fp32", "w8a16", "w4a16", "w8a8"])
    args = parser.parse_args()
    fp32 = tuili.load()
    vocab = fp32.config.vocab_size
    prompt = torch.randint(3, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    engines = {}
    for name in args.models:
        model = quantized(fp32, name)
        for fast in (True, False):
            engines[(name, fast)] = llm = LLM(model, max_num_seqs=1, prefix_caching=False, fast_decode=fast)
            decode_rate(llm, prompt[:16], 4)  # warm-up: kernels packed, plans built
    rates: dict[tuple[str, bool], list[float]] = {run: [] for run in engines}
    for _ in range(args.rounds):
        for run, llm in engines.items():
            rates[run].append(decode_rate(llm, prompt, args.new_tokens))

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    print(
        f"{date.today()} · {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens\n"
    )
    rows = [
        [
            name,
            f"{statistics.median(rates[(name, True)]):.1f}",
            f"{statistics.median(rates[(name, False)]):.1f}",
            f"{ratio((name, True), (name, False)):.2f}×",
            f"{ratio((name, True), (args.models[0], True)):.2f}×",
        ]
        for name in args.models
    ]
    header = ["model", "C++ step tok/s", "module forward tok/s", "C++ vs module", f"vs {args.models[0]} (C++)"]
    print(markdown_table(header, rows))
    print()
    print(
        markdown_table(
            ["model × step", *[f"round {i + 1}" for i in range(args.rounds)]],
            [
                [f"{name}, {'C++' if fast else 'module'}", *[f"{r:.1f}" for r in rates[(name, fast)]]]
                for name, fast in engines
            ],
        )
    )


if __name__ == "__main__":
    main()
