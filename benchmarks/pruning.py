"""Pruning on the default model, one run: perplexity at 50% unstructured and at 2:4 for magnitude,
Taylor, SparseGPT and Wanda; structured pruning (25% of MLP neurons, a third of the query heads,
4 layers): perplexity, parameters and decode tokens/s against the dense model.

    .venv/bin/python benchmarks/pruning.py [--calib-samples 32] [--eval-tokens 16384]

Every row starts from a fresh copy of the dense fp32 model. Perplexity: the built-in evaluation
split in 512-token windows. Calibration: the built-in calibration split, 512-token windows.
Decode: the engine at batch 1, 128 new tokens after a 32-token prompt (best of 3), measured in
alternating rounds over the dense and pruned models, median of the rounds.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import tuili
from tuili.data import calibration_samples, eval_windows, load_text, perplexity
from tuili.engine import LLM, SamplingParams
from tuili.pipeline.analysis import analyze
from tuili.pipeline.report import markdown_table
from tuili.prune import SemiStructured, Unstructured, prune_, sparsity_report
from tuili.prune.methods import method_named
from tuili.prune.structured import drop_layers_, prune_heads_, prune_mlp_


def decode_tok_s(model) -> float:
    llm = LLM(model, max_num_seqs=1)
    prompt = model.tokenizer.encode("The history of the printing press begins")[:32]
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    llm.generate([prompt], params)
    return max(llm.generate([prompt], params)[0].decode_tokens_per_second for _ in range(3))


def linear_bytes(model) -> int:
    return sum(
        m.weight.numel() * m.weight.element_size() for m in model.module.modules() if isinstance(m, torch.nn.Linear)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternating decode measurements per model (median)")
    parser.add_argument("--structured-only", action="store_true", help="skip the unstructured and N:M table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense = tuili.load("default")
    tok = dense.tokenizer
    calib = calibration_samples(tok.encode(load_text("builtin", "calibration")), args.calib_samples, 512, seed=0)
    windows = eval_windows(tok.encode(load_text("builtin", "evaluation")), 512, args.eval_tokens)

    def ppl(model) -> float:
        return perplexity(model.module, windows, progress=False).perplexity

    base = ppl(dense)
    print(f"dense perplexity {base:.3f}", flush=True)
    rows = []
    targets = () if args.structured_only else (("50% unstructured", Unstructured(0.5)), ("2:4", SemiStructured(2, 4)))
    for target_name, target in targets:
        for method in ("magnitude", "taylor", "sparsegpt", "wanda"):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            prune_(model, target, method_named(method), calib=calib, progress=False)
            seconds = time.perf_counter() - start
            report = sparsity_report(model.module)
            value = ppl(model)
            rows.append(
                [
                    target_name,
                    method,
                    f"{report.sparsity:.1%}",
                    f"{value:.3f}",
                    f"{value - base:+.3f}",
                    f"{seconds:.0f}",
                ]
            )
            print(rows[-1], flush=True)
    if rows:
        print()
        print(
            f"## Unstructured and N:M ({time.strftime('%Y-%m-%d')}; dense perplexity {base:.3f}, "
            f"{windows.numel():,} tokens; {args.calib_samples} × 512 calibration tokens)\n"
        )
        print(
            markdown_table(
                ["target", "method", "zeros (all linears incl. dense head)", "perplexity", "Δ vs dense", "prune s"],
                rows,
            )
        )

    dense_bytes, dense_params = linear_bytes(dense), analyze(dense).num_parameters
    cases = [
        ("25% of MLP neurons (activation)", lambda m: prune_mlp_(m, 0.25, "activation", calib)),
        ("1 of 3 query heads per KV group (activation)", lambda m: prune_heads_(m, 0.25, "activation", calib)),
        ("4 layers (block influence)", lambda m: drop_layers_(m, 4, calib)),
    ]
    models = {"dense": dense}
    for name, run in cases:
        models[name] = copy.deepcopy(dense)
        run(models[name])
    # decode speed in alternating rounds (the machine is shared: a slow minute hits every model)
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            speeds[name].append(decode_tok_s(model))
    speed = {name: sorted(v)[len(v) // 2] for name, v in speeds.items()}
    structured = [["dense", f"{dense_params:,}", "", f"{base:.3f}", f"{speed['dense']:.1f}", "", ""]]
    for name, _ in cases:
        model = models[name]
        removed = 1 - linear_bytes(model) / dense_bytes
        gain = speed[name] / speed["dense"] - 1
        structured.append(
            [
                name,
                f"{analyze(model).num_parameters:,}",
                f"{removed:.1%}",
                f"{ppl(model):.3f}",
                f"{speed[name]:.1f}",
                f"{gain:+.1%}",
                f"{gain / removed:.2f}" if removed else "",
            ]
        )
        print(structured[-1], flush=True)
    print(f"\n## Structured ({time.strftime('%Y-%m-%d')}; fp32, engine decode at batch 1, {args.threads} threads)\n")
    print(
        markdown_table(
            [
                "pruned",
                "parameters",
                "linear bytes removed",
                "perplexity",
                "decode tok/s",
                "decode vs dense",
                "speed-up / bytes removed",
            ],
            structured,
        )
    )


if __name__ == "__main__":
    main()
