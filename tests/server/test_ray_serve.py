"""`tuili serve --ray` as a user runs it: a local Ray cluster (loopback, started and stopped by the
command) with two replicas of a tiny model behind one OpenAI endpoint. The official client streams
and not through it, requests spread over both replicas, a replica killed under load costs no
request more than a clean error and is replaced, and SIGTERM leaves no Ray process behind."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from helpers import random_tiny
from test_shutdown import free_port

try:
    import ray  # noqa: F401
    from ray import serve  # noqa: F401
except ImportError as e:  # the dev extra installs ray[serve]; only a platform without its wheels lands here
    pytest.skip(
        f"Ray Serve cannot be imported here ({e}); install it with pip install 'tuili[ray]'", allow_module_level=True
    )

REPLICA = "ServeReplica:tuili:tuili-replica"


def replica_pids() -> set[int]:
    found = subprocess.run(["pgrep", "-f", REPLICA], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray") / "tiny"
    random_tiny("llama-gqa", max_position_embeddings=4096).save(path)
    return path


def start(folder, router: str):
    """`tuili serve --ray` with 2 replicas and `router`, once it answers /ready: (base URL, process)."""
    port = free_port()
    command = [sys.executable, "-c", "import sys; from tuili.cli import main; sys.exit(main())", "serve",
               "--model", str(folder), "--served-model-name", "tiny", "--port", str(port), "--ray",
               "--replicas", "2", "--grace", "5", "--ray-router", router,
               "--max-ongoing-requests", "8"]  # fmt: skip  # 24 requests at once cannot all fit one replica
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return base, process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"tuili serve --ray did not become ready:\n{process.communicate()[0][-5000:]}")


def stopped(process) -> None:
    """SIGTERM: the command exits 0 and leaves no Ray process behind."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    deadline = time.monotonic() + 60  # Ray's workers exit on their own schedule after the raylet
    while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server"]).returncode == 0:
        time.sleep(0.5)
    left = subprocess.run(["pgrep", "-af", "ray::|raylet|gcs_server"], capture_output=True, text=True).stdout
    assert not left, f"Ray processes left behind:\n{left}"


@pytest.fixture(scope="module")
def cluster(folder):
    base, process = start(folder, "prefix")
    yield base, process
    if process.poll() is None:
        process.kill()


def ask_both(base: str) -> set[str]:
    """The replicas that answered 24 concurrent requests."""

    async def ask(client, i):
        body = {"model": "tiny", "prompt": f"spread {i}", "max_tokens": 40, "ignore_eos": True}
        response = await client.post(f"{base}/v1/completions", json=body)
        assert response.status_code == 200
        return response.headers["x-tuili-replica"]

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(ask(client, i) for i in range(24)))

    return set(asyncio.run(main()))


def test_the_openai_client_streams_and_not_through_ray(cluster):
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster[0]}/v1", api_key="none")
    done = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    chunks = list(client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    again = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0)
    assert streamed == again.choices[0].text  # the same greedy text, whichever replica answered
    with pytest.raises(Exception, match="does not exist"):  # the replica's own errors come through unchanged
        client.completions.create(model="nope", prompt="hello", max_tokens=1)


def test_requests_spread_over_both_replicas(cluster):
    assert len(ask_both(cluster[0])) == 2


def test_prompts_that_begin_alike_go_to_the_replica_that_has_them_cached(cluster):
    systems = [f"System prompt {g}: " + "the policy says many things. " * 40 for g in range(4)]
    owners: dict[int, set[str]] = {g: set() for g in range(4)}
    cached = 0
    for i in range(16):
        g = i % 4
        body = {"model": "tiny", "prompt": f"{systems[g]}user {i} asks", "max_tokens": 1}
        response = httpx.post(f"{cluster[0]}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200
        owners[g].add(response.headers["x-tuili-replica"])
        cached += response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] if i >= 4 else 0
    assert all(len(replicas) == 1 for replicas in owners.values()), owners
    assert cached >= 12 * 1000  # each later request found its ~1,200-token system prompt cached


def test_a_killed_replica_costs_clean_errors_at_most_and_is_replaced(cluster):
    base = cluster[0]
    before = replica_pids()
    assert len(before) == 2

    async def stream(client, i, killed: asyncio.Event):
        body = {"model": "tiny", "prompt": f"stream {i}", "max_tokens": 240, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        chunks, tokens, finished, error = 0, 0, False, None
        async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
            assert response.status_code == 200
            replica = response.headers["x-tuili-replica"]
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    finished = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]["message"]
                    elif event["choices"]:
                        chunks += 1
                    else:
                        tokens = event["usage"]["completion_tokens"]
                if i == 0 and chunks == 1 and not killed.is_set():  # the first stream is under way: kill its replica
                    os.kill(int(replica.split("pid ")[1].rstrip(")")), signal.SIGKILL)
                    killed.set()
        return replica, tokens, finished, error

    async def whole(client, i):
        body = {"model": "tiny", "prompt": f"whole {i}", "max_tokens": 200, "ignore_eos": True}
        response = await client.post(f"{base}/v1/completions", json=body)
        return response.status_code, response.json()

    async def main():
        killed = asyncio.Event()
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [stream(client, i, killed) for i in range(6)]
            wholes = [whole(client, i) for i in range(6)]
            return await asyncio.gather(*streams, *wholes), killed.is_set()

    results, killed = asyncio.run(main())
    assert killed
    streams, wholes = results[:6], results[6:]
    for _, tokens, finished, error in streams:
        # each stream either ran to [DONE] or, if its replica died under it, ended with an error event
        assert (finished and error is None and tokens == 240) or (error and "stopped" in error and not finished)
    assert not streams[0][2] and "stopped" in streams[0][3]
    for status, body in wholes:  # a whole answer is sent again elsewhere, so it completes, or says why not
        assert status == 200 and len(body["choices"][0]["text"]) > 0 or status == 503 and "error" in body
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (len(replica_pids()) == 2 and replica_pids() != before):
        time.sleep(0.5)
    assert len(replica_pids()) == 2 and replica_pids() != before, "Ray Serve did not replace the replica in 60 s"
    answered = {httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                           timeout=60).status_code for _ in range(8)}  # fmt: skip
    assert answered == {200}


def test_sigterm_takes_ray_down_with_it(cluster):
    base, process = cluster
    stopped(process)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/health", timeout=2)


def test_direct_routing_serves_through_ray_s_proxy_alone(folder):
    base, process = start(folder, "direct")
    try:
        from openai import OpenAI

        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        chunks = list(client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0, stream=True))
        whole = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert len(ask_both(base)) == 2
        stopped(process)
    finally:
        if process.poll() is None:
            process.kill()
