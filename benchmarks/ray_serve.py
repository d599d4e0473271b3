"""Scale-out serving through Ray Serve on this machine, beside `tuili serve` alone.

Setups are started one after another on the same model and cores (two Ray clusters cannot share
the machine fairly, so servers do not alternate as in serving.py); the shared machine drifts, so
read each phase's ratios, not absolute times across phases.

1. Overhead: 1 client, 12 streamed requests (serving.py's load client: ~100-token prompts, 64 new
   tokens), TTFT and ITL p50 of `tuili serve` alone against one Ray replica of the same threads,
   direct (Ray's proxy to the replica) and through tuili's ingress (the prefix router's path);
   with 2 engine threads (all the cores) and with 1 (a core left for Ray's own processes).
2. Levels: `tuili serve` alone (2 threads), Ray 1 replica × 2 threads and 2 replicas × 1 thread,
   each at 1, 4, 16 and 64 streaming clients: output tok/s, TTFT, ITL, errors. Each Ray setup then
   takes 64 clients of which every third leaves after 4 tokens: every other stream must end with
   [DONE] and no answer may be a 5xx.
3. Routing: 2 replicas × 1 thread, prefix-aware router against Ray Serve's power of two choices, on
   8 system prompts (~350 tokens each) × many users (a short question each, 16 clients): the
   prefix-cache hit rate (cached prompt tokens / prompt tokens, from each answer's usage) and
   TTFT; with the default KV cache (a replica holds all 8 prompts) and with 0.1 GB (it holds 4).

    .venv/bin/python benchmarks/ray_serve.py [--model default] [--skip overhead levels routing]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving import ServerSpec, _pct, load_level, start_server, stream_completion, tuili_spec

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
# GB a replica: 0.1 GB is 145 blocks of 16 fp32 tokens; the 8 system prompts take 22 blocks each
# (running requests share them through the prefix cache) and each request ~3 blocks of its own:
# a replica that sees all 8 (power of two choices) cannot keep them, one that sees 4 can
KV_TIGHT = "0.1"


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to `tuili serve` alone (with --ray it takes its Ray cluster down itself), then make
    sure no Ray process is left for the next setup."""
    process.terminate()
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
    subprocess.run([RAY, "stop", "--force"], capture_output=True)


def measure(spec: ServerSpec, port: int, work: Path, levels: list[int], leave: bool) -> dict:
    print(f"{spec.name} ...", file=sys.stderr, flush=True)
    server = start_server(spec, port, work)
    try:
        rows = []
        for clients in levels:
            row = asyncio.run(load_level(port, spec.model, clients, max(12, clients), 150, seed=clients))
            print(f"  {clients} clients: {row['tok_s']:.1f} tok/s, errors {row['errors']}", file=sys.stderr)
            rows.append(row)
        left = asyncio.run(leaving(port, spec.model)) if leave else None
        return {"rows": rows, "leaving": left}
    finally:
        stop(server.process)


async def leaving(port: int, model: str, clients: int = 64) -> dict:
    """`clients` streams at once, every third closing its connection after 4 tokens."""
    texts = [f"Stream {i}: " + "tell me about the weather and the sea. " * 4 for i in range(clients)]

    async def one(i: int):
        body = {"model": model, "prompt": texts[i], "max_tokens": 64, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
        return await stream_completion(port, body, leave_after=4 if i % 3 == 0 else 0)

    results = await asyncio.gather(*(one(i) for i in range(clients)))
    stayed = [r for r in results if not r.left]
    return {
        "clients": clients,
        "left": sum(r.left for r in results),
        "completed": sum(r.ok and r.tokens == 64 for r in stayed),
        "stayed": len(stayed),
        "server_errors": sum(r.status >= 500 or r.status == 0 for r in results),
    }


SYSTEM = (
    "You are assistant number {g} of the {topic} help desk. Answer in a friendly tone, cite the policy "
    "section you rely on, and never promise refunds beyond what the policy allows. "
)
TOPICS = ("billing", "shipping", "returns", "accounts", "security", "hardware", "software", "travel")


def system_prompts(chars: int = 1400) -> list[str]:
    """8 distinct system prompts of about `chars` characters (about 350 tokens)."""
    from tuili.data import load_text

    text = load_text("builtin", "evaluation")
    rng = random.Random(5)
    out = []
    for g, topic in enumerate(TOPICS):
        head = SYSTEM.format(g=g, topic=topic)
        start = rng.randrange(0, len(text) - chars)
        out.append(head + text[start : start + chars - len(head)])
    return out


async def routing_load(port: int, model: str, requests: int = 96, clients: int = 16) -> dict:
    systems = system_prompts()
    rng = random.Random(11)
    queue = [(rng.randrange(len(systems)), i) for i in range(requests)]
    results = []

    async def client():
        while queue:
            group, i = queue.pop()
            prompt = f"{systems[group]}\n\nUser {i}: what should I do about order {i * 37 % 1000}?\nAssistant:"
            body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
            results.append(await stream_completion(port, body))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    good = [r for r in results if r.ok]
    ttft = sorted(r.ttft for r in good)
    return {
        "requests": len(results),
        "errors": len(results) - len(good),
        "hit_rate": sum(r.cached for r in good) / max(1, sum(r.prompt_tokens for r in good)),
        "ttft_p50": _pct(ttft, 50),
        "ttft_p99": _pct(ttft, 99),
        "req_s": len(good) / wall,
    }


def route(spec: ServerSpec, port: int, work: Path) -> dict:
    print(f"{spec.name} ...", file=sys.stderr, flush=True)
    server = start_server(spec, port, work)
    try:
        return asyncio.run(routing_load(port, spec.model))
    finally:
        stop(server.process)


def ray_options(replicas: int, threads: int, router: str = "prefix") -> list[str]:
    """`tuili serve --ray` options: `replicas` of `threads` CPUs each."""
    return ["--ray", "--replicas", str(replicas), "--cpus-per-replica", str(threads), "--ray-router", router]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--skip", nargs="*", default=[], choices=["overhead", "levels", "routing"])
    parser.add_argument(
        "--kv",
        nargs="*",
        default=[None, KV_TIGHT],
        help="routing: KV-cache GB a replica (default: the engine's, then 0.1)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tuili-ray-"))
    subprocess.run([RAY, "stop", "--force"], capture_output=True)
    date = time.strftime("%Y-%m-%d")
    if "overhead" not in args.skip:
        overhead = {}
        for threads in (2, 1):
            overhead[("alone", threads)] = measure(
                tuili_spec("alone", args.model, threads, []), args.port, work, [1], False
            )
            for router in ("direct", "prefix"):
                spec = tuili_spec(f"ray-{router}", args.model, threads, ray_options(1, threads, router))
                overhead[(router, threads)] = measure(spec, args.port, work, [1], False)
        print_overhead(overhead, date)
    if "levels" not in args.skip:
        setups = [
            ("tuili serve alone, 2 threads", tuili_spec("alone", args.model, 2, []), False),
            ("Ray Serve, 1 replica × 2 threads", tuili_spec("ray-1x2", args.model, 2, ray_options(1, 2)), True),
            ("Ray Serve, 2 replicas × 1 thread", tuili_spec("ray-2x1", args.model, 1, ray_options(2, 1)), True),
        ]
        results = {name: measure(spec, args.port, work, args.levels, leave) for name, spec, leave in setups}
        print_levels(results, date)
    if "routing" not in args.skip:
        routed = {}
        for kv in args.kv:
            for router in ("pow2", "prefix"):
                extra = ray_options(2, 1, router) + (["--kv-cache-gb", kv] if kv else [])
                spec = tuili_spec(f"route-{router}-{kv or 'default'}", args.model, 1, extra)
                routed[(router, kv)] = route(spec, args.port, work)
        print_routing(routed, date)


def print_overhead(overhead: dict, date: str) -> None:
    print(f"\n## Ray's overhead at 1 client ({date}): 12 streamed requests, ~100-token prompts, 64 tokens\n")
    print("| engine threads | setup | TTFT p50 ms | vs alone | ITL p50 ms | vs alone | output tok/s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for threads in (2, 1):
        alone = overhead[("alone", threads)]["rows"][0]
        for name in ("alone", "direct", "prefix"):
            r = overhead[(name, threads)]["rows"][0]
            label = {"alone": "tuili serve alone", "direct": "Ray, direct (proxy → replica)",
                     "prefix": "Ray, through the ingress (prefix router)"}[name]  # fmt: skip
            ttft, itl = r["ttft_p50"] / alone["ttft_p50"] - 1, r["itl_p50"] / alone["itl_p50"] - 1
            print(f"| {threads} | {label} | {1000 * r['ttft_p50']:.0f} | {ttft:+.0%} | {1000 * r['itl_p50']:.1f} "
                  f"| {itl:+.0%} | {r['tok_s']:.1f} |")  # fmt: skip


def print_levels(results: dict, date: str) -> None:
    print(f"\n## Ray Serve beside tuili serve ({date}): streaming /v1/completions, ~100-token prompts, 64 tokens\n")
    print(
        "| setup | clients | requests | errors | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        for r in result["rows"]:
            print(f"| {name} | {r['clients']} | {r['requests']} | {r['errors']} | {r['tok_s']:.1f} "
                  f"| {1000 * r['ttft_p50']:.0f} | {1000 * r['ttft_p99']:.0f} | {1000 * r['itl_p50']:.1f} "
                  f"| {1000 * r['itl_p99']:.1f} |")  # fmt: skip
    print("\n| setup | clients | left after 4 tokens | of the rest, completed | 5xx or no answer |")
    print("|---|---:|---:|---:|---:|")
    for name, result in results.items():
        if result["leaving"]:
            x = result["leaving"]
            print(
                f"| {name} | {x['clients']} | {x['left']} | {x['completed']} of {x['stayed']} | {x['server_errors']} |"
            )


def print_routing(routed: dict, date: str) -> None:
    print(f"\n## Routing ({date}): 2 replicas × 1 thread, 8 system prompts (~350 tokens) × 96 users, 16 clients\n")
    print("| router | KV cache per replica | requests | errors | prefix-cache hit rate | TTFT p50 ms | TTFT p99 ms "
          "| req/s |\n|---|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for (router, kv), r in routed.items():
        memory = f"{kv} GB (4 of the 8 prompts fit)" if kv else "default (all 8 prompts fit)"
        print(f"| {router} | {memory} | {r['requests']} | {r['errors']} | {r['hit_rate']:.1%} "
              f"| {1000 * r['ttft_p50']:.0f} | {1000 * r['ttft_p99']:.0f} | {r['req_s']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
