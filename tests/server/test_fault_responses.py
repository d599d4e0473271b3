"""Faults seen from the HTTP side: one request's own fault ends its response alone (an error event in
its stream, a 500 without), and a fault in the engine's shared work makes `serve` exit non-zero."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from live import MODEL, live_server

from tuili.server import ServerConfig, build_server, serve
from tuili.server.serve import ENGINE_FAILED


def inject(engine, request_prefix: str) -> None:
    pick = engine._pick

    def faulty(request, row, greedy, allowed):
        if request.id.startswith(request_prefix) and len(request.output_ids) == 3:
            raise RuntimeError("injected fault")
        return pick(request, row, greedy, allowed)

    engine._pick = faulty


def stream_text(base: str, prompt: str) -> tuple[str, list[dict]]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True}
    text, errors = "", []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"])
                else:
                    text += event["choices"][0]["text"]
    return text, errors


def test_one_requests_fault_ends_its_own_response_only(tiny_model):
    with live_server(tiny_model, block_size=4) as (base, server):
        clean = {p: stream_text(base, p)[0] for p in ("alpha", "beta", "gamma")}
        bad_ids = []
        original = server.llm.generate

        def tag(prompt, params, request_id=None):  # the third prompt's requests fail in their own work
            if prompt[:5] == server.tokenizer.encode("gamma")[:5]:
                request_id = f"bad-{request_id}"
                bad_ids.append(request_id)
            return original(prompt, params, request_id)

        server.llm.generate = tag
        inject(server.llm.engine, "bad-")
        with ThreadPoolExecutor(3) as pool:
            results = dict(zip(clean, pool.map(lambda p: stream_text(base, p), clean)))
        assert results["alpha"] == (clean["alpha"], []) and results["beta"] == (clean["beta"], [])
        text, errors = results["gamma"]
        assert bad_ids and len(errors) == 1 and "injected fault" in errors[0]["message"]
        body = {"model": MODEL, "prompt": "gamma", "max_tokens": 8, "ignore_eos": True}  # reaches the third token
        r = httpx.post(f"{base}/v1/completions", json=body)
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        assert httpx.get(f"{base}/health").status_code == 200
        assert server.llm.engine.stats()["kv_usage"] == 0


def test_a_shared_fault_stops_the_engine_and_serve_exits_non_zero(tiny_model):
    server = build_server(tiny_model, ServerConfig(model_names=(MODEL,), warmup=False), block_size=4)

    def broken_forward(chunks):
        raise RuntimeError("the KV cache is corrupt")

    server.llm.engine._forward = broken_forward
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    answers = []

    def client():
        for _ in range(200):
            try:
                answers.append(httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30))
                return
            except httpx.TransportError:
                time.sleep(0.05)

    thread = threading.Thread(target=client)
    thread.start()
    status = serve(server, sock=sock, log_level="error")
    thread.join()
    assert status == ENGINE_FAILED
    assert answers and answers[0].status_code == 500 and "corrupt" in answers[0].json()["error"]["message"]
