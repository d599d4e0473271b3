"""tuili search against uniform recipes of the same size, on the default model, in one run.

For each uniform weight-only format (every linear layer alike, round to nearest, float head tied to
the embedding, as `tuili quantize --scheme ...` makes it) this measures its weights and perplexity,
then runs `tuili search --max-bytes` with that size as the budget and measures the searched plan:
the search should never exceed the budget and should lose less perplexity than the uniform model
of the same size. The search tries its default MLP sparsities (--mlp-sparsity to change them);
the tables give the fraction of MLP neurons the winning plan removed. Prints markdown tables.

    .venv/bin/python benchmarks/search.py [--max-tokens 16384] [--uniform "w4a16 g32"] [--speedup 2.5]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from tuili.data import eval_windows, load_text, perplexity
from tuili.models.loading import load
from tuili.pipeline.analysis import analyze
from tuili.pipeline.report import human_bytes, markdown_table
from tuili.pipeline.search import MLP_SPARSITIES, search
from tuili.pipeline.search_result import CANDIDATE_HEADERS, candidate_row
from tuili.quant import quantize_
from tuili.quant.config import Int4WeightOnly, Int8WeightOnly

UNIFORM = {"w8a16": Int8WeightOnly(), "w4a16 g32": Int4WeightOnly(32), "w4a16 g128": Int4WeightOnly(128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--no-uniform", action="store_true", help="only the speed searches")
    parser.add_argument(
        "--uniform",
        nargs="+",
        choices=list(UNIFORM),
        default=list(UNIFORM),
        help="the uniform formats whose sizes are the byte budgets",
    )
    parser.add_argument("--mlp-sparsity", type=float, nargs="+", default=list(MLP_SPARSITIES))
    parser.add_argument(
        "--speedup",
        type=float,
        nargs="*",
        default=[],
        help="also search under these decode speed-ups (measured against the float model)",
    )
    args = parser.parse_args()
    base = load(args.model)
    windows = eval_windows(base.tokenizer.encode(load_text("builtin", "evaluation")), 512, args.max_tokens)
    base_ppl = perplexity(base.module, windows, progress=False).perplexity
    rows = []
    for name in [] if args.no_uniform else args.uniform:
        scheme = UNIFORM[name]
        uniform = quantize_(load(args.model), scheme, progress=False)
        size = analyze(uniform).num_bytes
        ppl = perplexity(uniform.module, windows, progress=False).perplexity
        start = time.perf_counter()
        _, result = search(load(args.model), max_bytes=size, max_tokens=args.max_tokens, mlp_sparsity=args.mlp_sparsity)
        r = result.result
        counts = ", ".join(f"{o} {n}" for o, n in sorted(Counter(result.choice.values()).items()))
        rows.append(
            [
                name,
                human_bytes(size),
                f"{ppl:.3f} ({100 * (ppl / base_ppl - 1):+.2f}%)",
                human_bytes(r.num_bytes),
                f"{r.quality.perplexity:.3f} ({result.ppl_increase:+.2f}%)",
                "yes" if result.met["max_bytes"] else "NO",
                "yes" if r.quality.perplexity < ppl else "no",
                f"{result.mlp_sparsity:.1%}",
                counts,
                f"{time.perf_counter() - start:.0f} s",
            ]
        )
        print(
            markdown_table(
                [
                    "uniform",
                    "its weights",
                    "its perplexity",
                    "search: weights",
                    "search: perplexity",
                    "budget met",
                    "search better",
                    "MLP neurons removed",
                    "search's plan",
                    "search time",
                ],
                rows,
            ),
            flush=True,
        )
        print_candidates(f"at the size of {name}", result)
    speed_rows = []
    for speedup in args.speedup:
        _, result = search(
            load(args.model),
            min_speedup=speedup,
            max_ppl_increase=5.0,
            max_tokens=args.max_tokens,
            mlp_sparsity=args.mlp_sparsity,
        )
        speed_rows.append(
            [
                f"{speedup:.2f}×",
                f"{result.speedup:.2f}×",
                f"{result.ppl_increase:+.2f}%",
                human_bytes(result.result.num_bytes),
                f"{result.mlp_sparsity:.1%}",
                len(result.attempts),
                ", ".join(f"{o} {n}" for o, n in sorted(Counter(result.choice.values()).items())),
            ]
        )
        print_candidates(f"asked {speedup:.2f}×", result)
        print(
            markdown_table(
                ["asked speed-up", "measured", "Δ perplexity", "weights", "MLP neurons removed", "attempts", "plan"],
                speed_rows,
            ),
            flush=True,
        )
    print(f"\nfloat model: perplexity {base_ppl:.3f}, weights {human_bytes(analyze(base).num_bytes)}")


def print_candidates(title: str, result) -> None:
    """Every sparsity the search tried, each with its own measured plan."""
    print(f"\nsparsities tried, {title}:\n")
    print(markdown_table(CANDIDATE_HEADERS, [candidate_row(c) for c in result.candidates]), flush=True)


if __name__ == "__main__":
    main()
