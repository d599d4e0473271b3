"""`tuili serve` as a user runs it: a process that reports ready, and on SIGTERM stops accepting,
lets the request in flight finish, and exits 0."""

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from helpers import random_tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "tiny"
    random_tiny("llama-gqa").save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder, port, *extra):
    command = [
        sys.executable,
        "-c",
        "import sys; from tuili.cli import main; sys.exit(main())",
        "serve",
        "--model",
        str(folder),
        "--port",
        str(port),
        "--served-model-name",
        "tiny",
        "--threads",
        "1",
        *extra,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the server did not become ready:\n{process.communicate()[0]}")


def test_sigterm_drains_in_flight_requests_then_exits_0(folder):
    port = free_port()
    process = start(folder, port, "--grace", "60")
    base = f"http://127.0.0.1:{port}"
    body = {
        "model": "tiny",
        "prompt": "drain",
        "max_tokens": 240,
        "n": 8,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    texts, done, signalled, refused = [""] * 8, False, False, False
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                choice = json.loads(line[6:])["choices"][0]
                texts[choice["index"]] += choice["text"]
                if not signalled:  # the first chunk: the request is in flight
                    signalled = True
                    process.send_signal(signal.SIGTERM)
                    deadline = time.monotonic() + 10
                    while not refused and time.monotonic() < deadline:
                        try:  # soon the listening socket is closed: new connections are refused
                            httpx.get(f"{base}/health", timeout=2)
                            time.sleep(0.05)
                        except httpx.TransportError:
                            refused = True
        assert done and refused
        assert all(len(text.encode("utf-8", "surrogatepass")) >= 200 for text in texts)  # every choice ran on
        assert process.wait(timeout=60) == 0
        log = process.stdout.read()
        assert "Waiting for connections to close" in log or "Shutting down" in log
    finally:
        if process.poll() is None:
            process.kill()


def test_access_log_is_one_json_line_per_request(folder):
    port = free_port()
    process = start(folder, port, "--no-warmup")
    try:
        httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "nope", "prompt": "a"})
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    lines = [
        json.loads(line.split("tuili.server.access: ", 1)[1])
        for line in process.stdout.read().splitlines()
        if "tuili.server.access: " in line
    ]
    posts = [entry for entry in lines if entry["method"] == "POST"]
    assert [(e["path"], e["status"]) for e in posts] == [("/v1/completions", 200), ("/v1/completions", 404)]
    assert posts[0]["request_id"].startswith("cmpl-") and posts[0]["ms"] > 0


def test_a_port_in_use_is_a_clear_error(folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [
            sys.executable,
            "-c",
            "import sys; from tuili.cli import main; sys.exit(main())",
            "serve",
            "--model",
            str(folder),
            "--port",
            str(port),
            "--no-warmup",
            "--threads",
            "1",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "could not start" in done.stderr and "port" in done.stderr
