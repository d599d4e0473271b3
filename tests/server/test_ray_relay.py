"""The pieces of `tuili serve --ray` that need no cluster: the prompt digests the prefix router keys
on, and the relay that replays a forwarded request through a replica's ASGI app."""

import asyncio
import json

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'tuili[ray]'")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402

from tuili.server.ray.relay import CHUNK, Forwarded, prefix_digests, prompt_text, relay  # noqa: E402


def test_prompts_sharing_a_beginning_share_its_digests():
    system = "s" * (3 * CHUNK)
    a, b = prefix_digests(system + "user one"), prefix_digests(system + "user two, longer" * 40)
    assert len(a) == 3 and a == b[:3] and len(b) > 3
    assert prefix_digests("x" + system)[:1] != a[:1]
    assert prefix_digests("short") == ()  # under one chunk: nothing to route on
    assert len(prefix_digests("y" * 100 * CHUNK)) == 32  # the first 8 KiB at most


def test_the_prompt_text_of_chat_and_completions():
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"text": "hi"}]}]}
    text = prompt_text("/v1/chat/completions", json.dumps(chat).encode())
    assert text.startswith("system\x00be brief\x01") and "hi" in text
    assert prompt_text("/v1/completions", b'{"prompt": ["first", "second"]}') == "first"
    assert prompt_text("/v1/completions", b'{"prompt": [1, 2, 3]}') == "1,2,3"
    assert prompt_text("/v1/completions", b"not json") == ""
    assert prompt_text("/v1/models", b"") == ""


def _app(events: list):
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        return {"got": (await request.json())["x"], "query": request.url.query}

    @app.get("/stream")
    async def stream(request: Request):
        async def body():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events.append("stream closed")

        async def watch():
            while not await request.is_disconnected():
                await asyncio.sleep(0.01)
            events.append("disconnect seen")

        asyncio.get_running_loop().create_task(watch())
        return StreamingResponse(body(), media_type="text/event-stream")

    return app


def _request(method: str, path: str, body: bytes = b"", query: bytes = b"") -> Forwarded:
    return Forwarded(method, path, query, [(b"content-type", b"application/json")], body, ("10.0.0.1", 5))


def test_a_forwarded_request_gets_the_app_s_whole_answer():
    async def main():
        return [m async for m in relay(_app([]), _request("POST", "/echo", b'{"x": 7}', b"a=1"))]

    start, body = asyncio.run(main())
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert json.loads(body["body"]) == {"got": 7, "query": "a=1"} and not body.get("more_body")


def test_a_caller_that_stops_listening_disconnects_the_app():
    events: list = []

    async def main():
        answer = relay(_app(events), _request("GET", "/stream"))
        chunks = []
        async for message in answer:
            if message["type"] == "http.response.body":
                chunks.append(message["body"])
            if len(chunks) == 3:
                break
        await answer.aclose()  # what a cancelled Ray call does to the replica's generator
        await asyncio.sleep(0.2)
        return chunks

    chunks = asyncio.run(main())
    assert chunks[0] == b"data: 0\n\n" and len(chunks) == 3
    assert "stream closed" in events  # the app stopped generating instead of running on for nobody


def _applications(config: dict):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema for config files
    return config["applications"]


def test_the_shipped_serve_configs_build_and_name_real_deployments():
    from pathlib import Path

    import yaml

    from tuili.cli.serve import ray_app
    from tuili.server.ray.deployments import INGRESS_NAME, REPLICA_NAME

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    local = yaml.safe_load((deploy / "ray" / "serve_config.yaml").read_text())
    kuberay = yaml.safe_load((deploy / "kuberay" / "rayservice.yaml").read_text())
    for config in (local, yaml.safe_load(kuberay["spec"]["serveConfigV2"])):
        (app,) = _applications(config)
        assert app["import_path"] == "tuili.cli.serve:ray_app"
        assert ray_app(app["args"]) is not None  # tuili's options parse; nothing loads until a replica starts
        assert {d["name"] for d in app["deployments"]} == {REPLICA_NAME, INGRESS_NAME}


def test_a_bad_option_in_a_serve_config_is_tuili_s_clear_error():
    from tuili.cli.serve import ray_app

    with pytest.raises(ValueError, match="--max-num-seqs must be positive"):
        ray_app({"options": ["--max-num-seqs", "0"]})
    with pytest.raises(ValueError, match="not \\['model'\\]"):
        ray_app({"model": "default"})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replicas", "2"], "apply to replicas: add --ray"),
        (["--ray", "--replicas", "2", "--max-replicas", "3"], "not both"),
        (["--ray", "--min-replicas", "1"], "needs --max-replicas"),
        (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "below --min-replicas"),
        (["--ray", "--target-ongoing-requests", "4"], "add --max-replicas"),
        (["--ray", "--cpus-per-replica", "0"], "must be positive"),
        (["--ray", "--replicas", "0"], "must be positive"),
    ],
)
def test_ray_options_that_cannot_be_honoured_are_refused(argv, message):
    from tuili.cli.serve import options

    with pytest.raises(ValueError, match=message):
        options(argv)


def test_ray_options_reach_the_deployment():
    from tuili.cli import ray_options
    from tuili.cli.serve import options

    args = options(["--ray", "--max-replicas", "4", "--max-num-seqs", "8", "--cpus-per-replica", "2"])
    got = ray_options.replicas(args)
    assert (got.min_replicas, got.max_replicas, got.max_ongoing_requests, got.cpus_per_replica) == (None, 4, 32, 2.0)
    assert got.router == "pow2"


def test_chunks_a_slow_caller_has_not_read_yet_travel_together_unchanged():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(5):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def main():
        messages = []
        async for message in relay(app, _request("GET", "/stream")):
            messages.append(message)
            await asyncio.sleep(0.05)  # a caller slower than the app
        return messages

    messages = asyncio.run(main())
    bodies = [m["body"] for m in messages[1:]]
    assert b"".join(bodies) == b"".join(f"data: {i}\n\n".encode() for i in range(5)) + b"data: [DONE]\n\n"
    assert len(bodies) < 6 and not messages[-1]["more_body"]
