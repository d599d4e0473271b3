"""Many concurrent streaming clients, a third leaving mid-stream and a tenth sending invalid requests:
every valid request that stays completes with its full text, every invalid one gets a 400, nothing is
lost, and afterwards nothing is left running and the KV cache is empty."""

import asyncio
import json
import random

import httpx
from live import MODEL, live_server, metric, samples

from tuili.engine import LLM, SamplingParams


async def stream(client: httpx.AsyncClient, prompt: str, max_tokens: int, leave_after: int | None):
    """The streamed text, or None if this client hung up after `leave_after` chunks."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    text, chunks = "", 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return text
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return None  # leaving the block closes the connection mid-stream
    raise AssertionError("the stream ended without [DONE]")


INVALID = [  # what careless or hostile clients send, raw: each must be a 400, never a 5xx or a hang
    '{"model": "tiny", "prompt": "a\\ud800", "stream": true}',
    '{"model": "tiny", "prompt": "a", "temperature": NaN, "stream": true}',
    '{"model": "tiny", "prompt": "a", "seed": 18446744073709551621, "stream": true}',
    '{"model": "tiny", "prompt": "a", "guided_regex": "a(", "stream": true}',
    '{"model": "tiny", "prompt": "a", "max_tokens": 100000, "stream": true}',
    '{"model": "tiny", "prompt": [1, 2, 99999], "stream": true}',
    '{"model": "tiny", "prompt": "a", "top_p": 0, "stream": true}',
]


async def invalid(client: httpx.AsyncClient, raw: str) -> int:
    response = await client.post("/v1/completions", content=raw.encode(), headers={"content-type": "application/json"})
    assert response.json()["error"]["message"]
    return response.status_code


def test_64_concurrent_streams_with_disconnects_and_invalid_requests(tiny_model):
    rng = random.Random(0)
    prompts = [f"client {i} says " + "x" * rng.randint(0, 40) for i in range(64)]
    lengths = [rng.randint(20, 60) for _ in prompts]
    bad = set(rng.sample(range(64), 7))  # a tenth
    leaving = set(rng.sample(sorted(set(range(64)) - bad), 21))  # a third

    async def main(base):
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
            return await asyncio.gather(
                *(
                    invalid(client, INVALID[i % len(INVALID)])
                    if i in bad
                    else stream(client, p, n, 3 if i in leaving else None)
                    for i, (p, n) in enumerate(zip(prompts, lengths))
                )
            )

    with live_server(tiny_model, block_size=4, max_num_seqs=16) as (base, server):
        before = samples(base)
        results = asyncio.run(main(base))
        expected = LLM(tiny_model).generate(
            prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
        )
        for i, (text, want) in enumerate(zip(results, expected)):
            if i in bad:
                assert text == 400, f"client {i}"
            elif i in leaving:
                assert text is None
            else:
                assert text == want.text, f"client {i}"
        for _ in range(200):  # aborts reach the engine between its steps
            if metric(base, "tuili_num_requests_running") == 0 and metric(base, "tuili_kv_cache_usage_perc") == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert metric(base, "tuili_num_requests_running") == 0
        assert metric(base, "tuili_num_requests_waiting") == 0
        assert metric(base, "tuili_kv_cache_usage_perc") == 0
        assert server.in_flight == 0
        after = samples(base)
        assert (
            after['tuili_request_success_total{finished_reason="length"}']
            - before.get('tuili_request_success_total{finished_reason="length"}', 0)
            == 64 - 21 - 7
        )
        assert after['tuili_request_success_total{finished_reason="abort"}'] == 21
        assert httpx.get(f"{base}/health").status_code == 200
