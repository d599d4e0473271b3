"""Speculative decoding on the default model (or --model), one run: batch-1 decode speed-up and
acceptance, greedy, every output checked token for token against plain decoding.

    .venv/bin/python benchmarks/speculative.py [--model default] [--draft FOLDER] [--rounds 3]
        [--llama-server /path/to/llama-server [--gguf FILE] [--draft-gguf FILE]]

1. Prompt lookup (no draft model) on an editing workload, where the answer repeats the prompt:
   chat requests that ask for a paragraph of the built-in evaluation text rewritten, 128 tokens.
2. A draft model (--draft: one `tuili distill --data self:N` made from the target) on chat prompts, 128 tokens.
3. 16 requests at once, speculation on (it stands aside above --max-batch decoding requests) and
   off: output tokens/s of the whole batch.
4. With --llama-server: llama.cpp's own speculative decoding on the same prompts, through its
   server (/completion, its `timings`): `--spec-type ngram-simple` against none, and with
   --draft-gguf, `--model-draft` against none.

Each figure is the median over --rounds rounds that alternate plain and speculative runs; a
speed-up is the median of the rounds' ratios, so that the shared machine's drifts hit both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import tuili
from tuili.data.corpus import builtin_text
from tuili.engine import LLM, SamplingParams
from tuili.engine.speculative import SpeculativeConfig
from tuili.pipeline.draft import alternating
from tuili.pipeline.report import markdown_table

NEW_TOKENS = 128
CHAT = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of the seasons on Earth?",
    "Give me three tips for learning a new language.",
    "Describe the water cycle in simple terms.",
    "Why is the sky blue?",
    "Write a polite email asking a colleague to review a report.",
    "What is the difference between a virus and a bacterium?",
]


def editing(count: int) -> list[list[dict]]:
    """Chat requests whose answers repeat their prompts: paragraphs of the evaluation text to rewrite."""
    paragraphs = [p.strip() for p in builtin_text("evaluation").split("\n\n") if 300 < len(p) < 700]
    ask = "Rewrite the following paragraph as plain prose on one line, keeping every word:\n\n"
    return [[{"role": "user", "content": ask + p}] for p in paragraphs[:: max(1, len(paragraphs) // count)][:count]]


def chats() -> list[list[dict]]:
    return [[{"role": "user", "content": c}] for c in CHAT]


def ids_of(model, conversations: list[list[dict]]) -> list[list[int]]:
    tokenizer = model.tokenizer
    return [tokenizer.encode(tokenizer.apply_chat_template(c), add_special_tokens=False) for c in conversations]


def batch1(plain: LLM, spec: LLM, prompts: list[list[int]], rounds: int) -> dict:
    """Per round: every prompt alone through each engine (decode tokens/s over all prompts)."""
    got = alternating(plain, spec, prompts, rounds, NEW_TOKENS)
    return {
        "plain tok/s": got["plain_tokens_per_second"],
        "speculative tok/s": got["speculative_tokens_per_second"],
        "speed-up": f"{got['speed_up']:.2f}×",
        "acceptance": f"{got['acceptance_rate']:.0%}",
        "tokens a check": f"{got['tokens_a_check']:.2f}",
        "identical": "yes" if got["identical_to_plain"] else "NO",
    }


def concurrent(plain: LLM, spec: LLM, prompts: list[list[int]], rounds: int) -> dict:
    """16 requests at once, greedy, 128 tokens each: the batch's output tokens/s."""
    batch = (prompts * 16)[:16]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    rates: dict[str, list[float]] = {"plain": [], "speculative": []}
    for r in range(rounds):
        for name, llm in [("plain", plain), ("speculative", spec)][:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            done = llm.generate(batch, params)
            rates[name].append(sum(len(c.outputs[0].token_ids) for c in done) / (time.perf_counter() - start))
    ratios = [s / p for s, p in zip(rates["speculative"], rates["plain"])]
    return {
        "plain tok/s": round(statistics.median(rates["plain"]), 1),
        "speculative tok/s": round(statistics.median(rates["speculative"]), 1),
        "ratio": f"{statistics.median(ratios):.3f}",
    }


def llama_server(binary: str, gguf: str, extra: list[str], prompts: list[str], threads: int, port: int) -> dict:
    """llama.cpp's server on `gguf` with `extra` options: decode tokens/s (its own timings) and
    its draft counts over the prompts, one at a time, greedy."""
    lib = str(Path(binary).parent)
    cmd = [binary, "-m", gguf, "--port", str(port), "-t", str(threads), "-np", "1", "-c", "4096", *extra]
    process = subprocess.Popen(cmd, env={"LD_LIBRARY_PATH": lib}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"llama-server did not start: {' '.join(cmd)}")
            time.sleep(0.3)
        tokens = seconds = drafted = accepted = 0.0
        for prompt in prompts:
            body = {"prompt": prompt, "n_predict": NEW_TOKENS, "temperature": 0, "cache_prompt": False}
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=600) as r:
                timings = json.load(r)["timings"]
            tokens += timings["predicted_n"]
            seconds += timings["predicted_ms"] / 1000
            drafted += timings.get("draft_n", 0)
            accepted += timings.get("draft_n_accepted", 0)
        return {"tok/s": tokens / seconds, "acceptance": accepted / drafted if drafted else None}
    finally:
        process.terminate()
        process.wait(30)


def llama_rows(args, name: str, texts: list[str], extra: list[str]) -> dict:
    gguf = args.gguf or str(tuili.models.loading.default_model_path())
    runs: dict[str, list[dict]] = {"plain": [], "speculative": []}
    for r in range(args.rounds):
        for kind, options in [("plain", []), ("speculative", extra)][:: 1 if r % 2 == 0 else -1]:
            runs[kind].append(llama_server(args.llama_server, gguf, options, texts, args.threads, 8190))
            print(f"  llama.cpp {name} {kind}: {runs[kind][-1]['tok/s']:.1f} tok/s", file=sys.stderr, flush=True)
    ratios = [s["tok/s"] / p["tok/s"] for s, p in zip(runs["speculative"], runs["plain"])]
    acceptance = runs["speculative"][-1]["acceptance"]
    return {
        "plain tok/s": round(statistics.median(r["tok/s"] for r in runs["plain"]), 1),
        "speculative tok/s": round(statistics.median(r["tok/s"] for r in runs["speculative"]), 1),
        "speed-up": f"{statistics.median(ratios):.2f}×",
        "acceptance": "" if acceptance is None else f"{acceptance:.0%}",
        "tokens a check": "",
        "identical": "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--draft", help="a draft model folder (tuili distill --data self:N)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary")
    parser.add_argument("--gguf", help="the GGUF llama-server runs (default: the default model's)")
    parser.add_argument("--draft-gguf", help="a GGUF of the draft, for llama-server's --model-draft")
    parser.add_argument("--skip", nargs="*", default=[], choices=["lookup", "draft", "concurrent"])
    args = parser.parse_args()
    # this folder's kernels.py would shadow the `kernels` package transformers imports (HF folders)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    model = tuili.load(args.model)
    plain = LLM(model, prefix_caching=False, threads=args.threads)
    editing_ids, chat_ids = ids_of(model, editing(args.prompts)), ids_of(model, chats()[: args.prompts])
    rows: dict[str, dict] = {}
    lookup = SpeculativeConfig(num_speculative_tokens=args.tokens)
    if "lookup" not in args.skip:
        spec = LLM(model, prefix_caching=False, speculative=lookup)
        rows["tuili, prompt lookup, editing"] = batch1(plain, spec, editing_ids, args.rounds)
        rows["tuili, prompt lookup, chat"] = batch1(
            plain, LLM(model, prefix_caching=False, speculative=lookup), chat_ids, args.rounds
        )
        print(rows, file=sys.stderr, flush=True)
    if args.draft and "draft" not in args.skip:
        config = SpeculativeConfig(
            method="draft", draft_model=tuili.load(args.draft), num_speculative_tokens=args.tokens
        )
        rows["tuili, tuili-made draft, chat"] = batch1(
            plain, LLM(model, prefix_caching=False, speculative=config), chat_ids, args.rounds
        )
        print(rows, file=sys.stderr, flush=True)
    if args.llama_server:
        texts = {
            "editing": [model.tokenizer.apply_chat_template(c) for c in editing(args.prompts)],
            "chat": [model.tokenizer.apply_chat_template(c) for c in chats()[: args.prompts]],
        }
        ngram = ["--spec-type", "ngram-simple", "--spec-draft-n-max", str(args.tokens)]
        rows["llama.cpp, ngram-simple, editing"] = llama_rows(args, "ngram editing", texts["editing"], ngram)
        if args.draft_gguf:
            draft = ["--model-draft", args.draft_gguf, "--spec-draft-n-max", str(args.tokens), "-td", str(args.threads)]
            rows["llama.cpp, same draft, chat"] = llama_rows(args, "draft chat", texts["chat"], draft)
    print(
        f"\n## Speculative decoding, batch 1, greedy, {NEW_TOKENS} new tokens ({time.strftime('%Y-%m-%d')}, "
        f"{args.threads} threads, {args.tokens} draft tokens a step)\n"
    )
    head = ["setting", *next(iter(rows.values()))]
    print(markdown_table(head, [[name, *row.values()] for name, row in rows.items()]))
    if "concurrent" not in args.skip:
        forced = SpeculativeConfig(num_speculative_tokens=args.tokens, max_batch=16)
        table = {
            "prompt lookup (stands aside above 4 decoding)": concurrent(
                plain, LLM(model, prefix_caching=False, speculative=lookup), editing_ids, args.rounds
            ),
            "prompt lookup kept on at 16": concurrent(
                plain, LLM(model, prefix_caching=False, speculative=forced), editing_ids, args.rounds
            ),
        }
        print(f"\n## 16 requests at once, editing prompts, {NEW_TOKENS} tokens each\n")
        print(markdown_table(["setting", *next(iter(table.values()))], [[n, *r.values()] for n, r in table.items()]))


if __name__ == "__main__":
    main()
