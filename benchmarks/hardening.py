"""Hardening benchmark: what hostile and careless clients do to `tuili serve`, measured.

1. Schema fuzzing: tests/server/test_fuzz.py with 200 generated cases per endpoint and mode (valid
   and invalid bodies) against a live server on a tiny model: responses by status, 5xx, hangs.
2. Soak: `tuili serve` on the default model, 64 concurrent clients sending 1,000 requests, a third of
   them leaving mid-stream and a tenth invalid (lone surrogates, NaN, seeds past 64 bits, unknown
   fields that would change the answer, max_tokens past the context, ...): lost requests, 5xx, KV
   usage and requests running afterwards, and the server's resident memory along the way.

    .venv/bin/python benchmarks/hardening.py [--examples 200] [--requests 1000] [--clients 64]
    git worktree add /tmp/tuili-old <commit>     # the same soak against an older tuili, as a baseline:
    .venv/bin/python benchmarks/hardening.py --baseline-src /tmp/tuili-old/src
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from serving import rss_mib, start_server, stop_server, tuili_spec  # benchmarks/serving.py

ROOT = Path(__file__).resolve().parents[1]
INVALID = [
    '{"model": "m", "prompt": "a\\ud800", "stream": true}',
    '{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}], "stream": true}',
    '{"model": "m", "prompt": "a", "temperature": NaN, "stream": true}',
    '{"model": "m", "prompt": "a", "seed": 18446744073709551621, "stream": true}',
    '{"model": "m", "prompt": "a", "guided_json": {"type": "object"}, "stream": true}',
    '{"model": "m", "prompt": "a", "functions": [{"name": "f"}], "stream": true}',
    '{"model": "m", "prompt": "a", "max_tokens": 8193, "stream": true}',
    '{"model": "m", "prompt": "a", "top_p": 0, "stream": true}',
    '{"model": "m", "prompt": "a", "repetition_penalty": -1, "stream": true}',
]
EXTREME = [  # valid, and numerically hostile: each must stream to the end
    {"temperature": 1e-30},
    {"top_p": 5e-324, "temperature": 2},
    {"repetition_penalty": 1e-300, "temperature": 1},
    {"repetition_penalty": 100, "temperature": 1},
    {"seed": 2**63 - 1},
    {"min_p": 1.0},
    {"top_k": 10**30},
]


def fuzz(examples: int) -> list[str]:
    """Run the fuzz suite with `examples` cases per endpoint and mode; its table as markdown lines."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "TUILI_FUZZ_EXAMPLES": str(examples), "TUILI_FUZZ_REPORT": str(report)}
        start = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/server/test_fuzz.py"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        if not report.exists():
            raise SystemExit(f"the fuzz suite failed before reporting:\n{run.stdout[-3000:]}")
        counts = json.loads(report.read_text())
    lines = ["| endpoint | cases | 2xx | 4xx | 5xx |", "|---|---:|---:|---:|---:|"]
    for endpoint, by_status in counts.items():
        statuses = Counter({int(k): v for k, v in by_status.items()})
        share = {c: sum(v for k, v in statuses.items() if k // 100 == c) for c in (2, 4, 5)}
        lines.append(f"| {endpoint} | {sum(statuses.values())} | {share[2]} | {share[4]} | {share[5]} |")
    verdict = "passed" if run.returncode == 0 else "FAILED"
    lines.append(f"\nfuzz suite {verdict} in {seconds:.0f} s ({examples} examples per endpoint and mode)")
    if run.returncode:
        lines.append("```\n" + run.stdout[-3000:] + "\n```")
    return lines


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, tally: Counter) -> None:
    """One request of a kind: 'invalid' (must be a 4xx), 'leave' (hangs up after 3 chunks), 'full'."""
    if kind == "invalid":
        raw = rng.choice(INVALID)
        path = "/v1/chat/completions" if '"messages"' in raw else "/v1/completions"
        r = await client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
        tally["4xx" if 400 <= r.status_code < 500 else f"{r.status_code} on invalid"] += 1
        return
    body = {
        "model": "m",
        "prompt": f"Request {rng.random():.6f}: write about rivers.",
        "max_tokens": 16,
        "stream": True,
        "ignore_eos": True,
        **(rng.choice(EXTREME) if rng.random() < 0.3 else {}),
    }
    chunks, done = 0, False
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            tally[f"{response.status_code} on valid"] += 1
            return
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                if line.startswith('data: {"error"'):
                    tally[f"error event: {json.loads(line[6:])['error']['message'][:120]}"] += 1
                    return
                chunks += 1
                if kind == "leave" and chunks >= 3:
                    tally["left"] += 1
                    return
    tally["completed" if done else "lost"] += 1


async def soak(port: int, pid: int, requests: int, clients: int) -> tuple[Counter, list[tuple[int, float]], float]:
    rng = random.Random(0)
    kinds = ["invalid" if i % 10 == 0 else "leave" if i % 3 == 0 else "full" for i in range(requests)]
    rng.shuffle(kinds)
    tally, memory, sent, answered = Counter(), [(0, rss_mib(pid))], 0, 0
    marks = {requests // 10, requests // 4, requests // 2, 3 * requests // 4, requests}
    start = time.perf_counter()

    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=60, limits=httpx.Limits(max_connections=clients + 8)
    ) as client:

        async def worker():
            nonlocal sent, answered
            while sent < requests:
                kind = kinds[sent]
                sent += 1
                try:
                    await one_request(client, kind, rng, tally)
                except httpx.TimeoutException:
                    tally["hung (60 s)"] += 1
                except httpx.HTTPError as e:
                    tally[f"transport error {type(e).__name__}"] += 1
                answered += 1
                if answered in marks:
                    memory.append((answered, rss_mib(pid)))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return tally, memory, time.perf_counter() - start


def gauges(port: int) -> dict[str, float]:
    lines = httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}
    return {
        k: values[k]
        for k in ("tuili_num_requests_running", "tuili_num_requests_waiting", "tuili_kv_cache_usage_perc")
        if k in values
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--baseline-src", help="also soak a server importing tuili from this src folder")
    parser.add_argument("--no-fuzz", action="store_true", help="the soak only")
    args = parser.parse_args()
    if not args.no_fuzz:
        print(f"## Schema fuzzing ({args.examples} examples per endpoint and mode)\n")
        print("\n".join(fuzz(args.examples)))

    rows = [("tuili", None)] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
    for name, src in rows:
        print(f"\n## Soak ({name}): {args.requests} requests from {args.clients} concurrent clients, default model\n")
        tally, memory, seconds, after, health, status = soak_server(src, args.requests, args.clients)
        print(f"{seconds:.0f} s\n\n| outcome | requests |\n|---|---:|")
        for outcome, n in sorted(tally.items()):
            print(f"| {outcome} | {n} |")
        print(
            f"\nafterwards: /health {health}, running {after.get('tuili_num_requests_running', 'n/a')}, "
            f"waiting {after.get('tuili_num_requests_waiting', 'n/a')}, KV usage "
            f"{after.get('tuili_kv_cache_usage_perc', 'n/a')}; exit status after SIGTERM {status}"
        )
        print_memory(memory, args.requests)


def soak_server(src: str | None, requests: int, clients: int):
    """Start `tuili serve` on the default model (from `src` if given), soak it, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = tuili_spec("tuili fp32", "default", os.cpu_count() or 2)
    if src:
        spec.env["PYTHONPATH"] = src
    with tempfile.TemporaryDirectory() as logs:
        server = start_server(spec, port, Path(logs))
        try:
            tally, memory, seconds = asyncio.run(soak(port, server.process.pid, requests, clients))
            time.sleep(1.0)  # the last aborts reach the engine between steps
            after, health = gauges(port), httpx.get(f"http://127.0.0.1:{port}/health").status_code
        finally:
            stop_server(server.process)
    return tally, memory, seconds, after, health, server.process.returncode


def print_memory(memory: list[tuple[int, float]], requests: int) -> None:
    print("\n| requests sent | server RSS (MiB) |\n|---:|---:|")
    for sent, rss in memory:
        print(f"| {sent} | {rss:.0f} |")
    settled = [rss for sent, rss in memory if sent >= requests // 4]
    print(
        f"\nRSS from {requests // 4} requests on: {min(settled):.0f}-{max(settled):.0f} MiB "
        f"(spread {max(settled) - min(settled):.0f} MiB)"
    )


if __name__ == "__main__":
    main()
