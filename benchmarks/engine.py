"""The engine against transformers and llama.cpp on the default model, one run, same threads.

    .venv/bin/python benchmarks/engine.py [--repeats 3] [--only transformers tuili-fp32 ...]
                                          [--llama-python /path/to/venv/bin/python]

Figures per system: decode tokens/s at batch 1 (128 new tokens after a 32-token prompt), prefill
tokens/s of a 512-token prompt, and total output tokens/s of 16 concurrent requests with prompts
of 64–512 tokens (seeded) and 128 new tokens each (eos ignored, so every system makes the same
number of tokens). transformers runs the 16 as one left-padded `generate` batch; tuili runs them
through `LLM.generate` (continuous batching); llama-cpp-python, which has no batching across
requests, runs them one after another (as its server does). llama.cpp runs the Q4_1 GGUF the
default model comes from, in a separate venv given by --llama-python (default: this interpreter
when it can import llama_cpp; install with CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import tuili
from tuili.data import builtin_text
from tuili.engine import LLM, SamplingParams
from tuili.pipeline.report import markdown_table
from tuili.quant import Int4WeightOnly, Int8DynamicActivation, Int8WeightOnly, quantize_

SYSTEMS = ("transformers", "tuili-fp32", "tuili-w8a16", "tuili-w4a16", "tuili-w4a16-g128", "tuili-w8a8", "llama.cpp")


def workload(tokens: list[int], seed: int = 0) -> tuple[list[int], list[int], list[list[int]]]:
    """A 32-token prompt for decoding, a 512-token one for prefill, and 16 prompts of 64–512 tokens."""
    rng = random.Random(seed)
    mixed = []
    for _ in range(16):
        length, start = rng.randint(64, 512), rng.randrange(0, len(tokens) - 512)
        mixed.append(tokens[start : start + length])
    return tokens[:32], tokens[1000:1512], mixed


def tuili_figures(model, short, long, mixed, n, repeats) -> dict:
    llm = LLM(model, max_num_seqs=16, max_num_batched_tokens=512, prefix_caching=False)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    llm.generate([short], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    decode = max(llm.generate([short], params)[0].decode_tokens_per_second for _ in range(repeats))
    one = SamplingParams(max_tokens=1, temperature=0)
    prefill = max(len(long) / llm.generate([long], one)[0].time_to_first_token for _ in range(repeats))
    start = time.perf_counter()
    outs = llm.generate(mixed, params)
    mixed_rate = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
    return {"decode": decode, "prefill": prefill, "mixed": mixed_rate}


@torch.inference_mode()
def transformers_figures(folder: Path, short, long, mixed, n, repeats) -> dict:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad = 2
    fixed = dict(do_sample=False, pad_token_id=pad)

    def timed(ids, mask, new):
        start = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **fixed)
        return time.perf_counter() - start

    ids = torch.tensor([short])
    ones = torch.ones_like(ids)
    timed(ids, ones, 4)
    decode = max((n - 1) / (timed(ids, ones, n) - timed(ids, ones, 1)) for _ in range(repeats))
    long_ids = torch.tensor([long])
    prefill = max(len(long) / _elapsed(lambda: hf(long_ids, logits_to_keep=1)) for _ in range(repeats))
    width = max(map(len, mixed))
    batch = torch.tensor([[pad] * (width - len(p)) + p for p in mixed])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in mixed])
    mixed_rate = len(mixed) * n / timed(batch, mask, n)
    return {"decode": decode, "prefill": prefill, "mixed": mixed_rate, "version": transformers.__version__}


def llama_cpp_figures(python: str, short, long, mixed, n, repeats, gguf: Path | None = None) -> dict | None:
    """llama.cpp's figures on `gguf` (default: the default model's Q4_1 file), in `python`'s venv."""
    args = {
        "gguf": str(gguf or tuili.models.default_model_path()),
        "threads": torch.get_num_threads(),
        "short": short,
        "long": long,
        "mixed": mixed,
        "new_tokens": n,
        "repeats": repeats,
    }
    runner = Path(__file__).with_name("llama_cpp_runner.py")
    done = subprocess.run([python, str(runner), json.dumps(args)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"llama.cpp skipped: {done.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _default_llama_python() -> str | None:
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--only", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument(
        "--llama-python", default=_default_llama_python(), help="a Python that can import llama_cpp (its own venv)"
    )
    args = ap.parse_args()
    n = args.new_tokens
    base = tuili.load("default")
    short, long, mixed = workload(base.tokenizer.encode(builtin_text("evaluation")))
    results = {}
    if "transformers" in args.only:
        results["transformers fp32 (generate)"] = transformers_figures(
            base.save(Path(tempfile.mkdtemp()) / "smollm2"), short, long, mixed, n, args.repeats
        )
        print(results, flush=True)
    quantized = {
        "tuili-fp32": ("tuili fp32", None),
        "tuili-w8a16": ("tuili W8A16, int8 head", Int8WeightOnly()),
        "tuili-w4a16": ("tuili W4A16 g32, int8 head", Int4WeightOnly(group_size=32)),
        "tuili-w4a16-g128": ("tuili W4A16 g128, int8 head", Int4WeightOnly(group_size=128)),
        "tuili-w8a8": ("tuili W8A8 dynamic (RTN), int8 head", Int8DynamicActivation()),
    }
    for key, (label, scheme) in quantized.items():
        if key not in args.only:
            continue
        model = (
            base
            if scheme is None
            else quantize_(
                copy.deepcopy(base), scheme, ignore=(), overrides={"lm_head": Int8WeightOnly()}, progress=False
            )
        )
        results[label] = tuili_figures(model, short, long, mixed, n, args.repeats)
        print(results, flush=True)
    if "llama.cpp" in args.only and args.llama_python:
        figures = llama_cpp_figures(args.llama_python, short, long, mixed, n, args.repeats)
        if figures:
            results[f"llama.cpp {figures.pop('version')} (Q4_1 GGUF; the 16 one after another)"] = figures

    print(
        f"\nSmolLM2-135M-Instruct, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {n} new tokens; 16 prompts of {min(map(len, mixed))}–{max(map(len, mixed))} "
        f"tokens\n"
    )
    baseline = next((v for k, v in results.items() if k.startswith("transformers")), None)
    rows = []
    for label, r in results.items():
        vs = f"{r['decode'] / baseline['decode']:.2f}×" if baseline else "—"
        rows.append(
            [
                label,
                f"{r['decode']:.1f}",
                vs,
                f"{r['prefill']:.0f}",
                f"{r['mixed']:.1f}",
                f"{r['mixed'] / r['decode']:.1f}×",
            ]
        )
    print(
        markdown_table(
            [
                "system",
                "decode tok/s, batch 1",
                "decode vs transformers",
                "prefill tok/s, 512",
                "16 concurrent, output tok/s",
                "16 concurrent vs own batch 1",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
