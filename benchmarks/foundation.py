"""tuili's fp32 model against transformers on the default model: load time, perplexity, speed.

    .venv/bin/python benchmarks/foundation.py [--max-tokens 65536] [--repeats 3]

Both run in this process, one after the other, on the same weights (transformers reads the
folder tuili saves, and also the GGUF file directly for the load-time row).
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time

import torch
import transformers

import tuili
from tuili.data import builtin_text, eval_windows, perplexity
from tuili.data.perplexity import window_nll
from tuili.engine import SamplingParams, generate
from tuili.pipeline.report import markdown_table


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    path = tuili.models.default_model_path()

    load_tuili = best(lambda: tuili.load("default"), 2)
    load_hf = best(
        lambda: transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ),
        1,
    )
    model = tuili.load("default")
    folder = model.save(tempfile.mkdtemp() + "/smollm2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    windows = eval_windows(model.tokenizer.encode(builtin_text("evaluation")), 512, args.max_tokens)
    ours = perplexity(model.module, windows, progress=False)
    start = time.perf_counter()
    with torch.inference_mode():
        nll = sum(window_nll(hf(w[None]).logits, w[None]).item() for w in windows)
    hf_seconds = time.perf_counter() - start
    theirs = math.exp(nll / ours.num_tokens)

    prompt = model.tokenizer.encode(builtin_text("evaluation"))[:512]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        prefill_tuili = best(lambda: model.module(ids, last_only=True), args.repeats)
        prefill_hf = best(lambda: hf(ids, logits_to_keep=1), args.repeats)
        n = args.new_tokens
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        short = prompt[:32]
        generate(model, short, params)
        dec_tuili = max(generate(model, short, params).decode_tokens_per_second for _ in range(args.repeats))
        short_ids = torch.tensor([short])
        hf.generate(short_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=2)

        def hf_decode():
            t0 = time.perf_counter()
            hf.generate(short_ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=2)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            hf.generate(short_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
            return (n - 1) / (time.perf_counter() - t0 - first)

        dec_hf = max(hf_decode() for _ in range(args.repeats))

    print(
        f"SmolLM2-135M-Instruct fp32, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}\n"
    )
    rows = [
        ["load the default GGUF (s)", f"{load_tuili:.2f}", f"{load_hf:.2f}", f"{load_hf / load_tuili:.2f}×"],
        [
            f"perplexity, {ours.num_tokens:,} tokens (512-token windows)",
            f"{ours.perplexity:.4f}",
            f"{theirs:.4f}",
            f"{100 * (ours.perplexity / theirs - 1):+.4f}%",
        ],
        ["perplexity wall time (s)", f"{ours.seconds:.1f}", f"{hf_seconds:.1f}", f"{hf_seconds / ours.seconds:.2f}×"],
        [
            "prefill 512 tokens (tok/s)",
            f"{512 / prefill_tuili:.0f}",
            f"{512 / prefill_hf:.0f}",
            f"{prefill_hf / prefill_tuili:.2f}×",
        ],
        [f"decode, batch 1, {n} tokens (tok/s)", f"{dec_tuili:.1f}", f"{dec_hf:.1f}", f"{dec_tuili / dec_hf:.2f}×"],
    ]
    print(markdown_table(["measure", "tuili", "transformers", "tuili vs transformers"], rows))


if __name__ == "__main__":
    main()
