"""A live tuili server on 127.0.0.1 for tests (uvicorn in a thread, on a port the OS picks), and /metrics."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from tuili.engine import AsyncLLM
from tuili.server import Server, ServerConfig

MODEL = "tiny"


@contextmanager
def live_server(model, config: ServerConfig = ServerConfig(model_names=(MODEL,)), **engine_options):
    """Start a server, wait for /ready, yield (base URL, Server); stop it afterwards."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = Server(AsyncLLM(model, **engine_options), config)
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not become ready")
        time.sleep(0.05)
    try:
        yield base, server
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


def samples(base: str) -> dict[str, float]:
    """Every sample in /metrics, keyed by its name with labels as Prometheus prints them."""
    lines = httpx.get(f"{base}/metrics").text.splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}


def metric(base: str, name: str) -> float:
    return samples(base)[name]
