"""Schema fuzzing of every endpoint with the engine running: schemathesis generates bodies and
parameters from the server's own OpenAPI schema, valid ones and invalid ones, and every response must
be below 500, come within TIMEOUT, and leave /health at 200.

TUILI_FUZZ_EXAMPLES sets the examples per endpoint and mode (20 in the suite; benchmarks/hardening.py
runs 200), and TUILI_FUZZ_REPORT names a JSON file for the counts by endpoint and status.
"""

import json
import os
import time
from collections import Counter, defaultdict

import httpx
import pytest
from fastapi.routing import APIRoute
from live import MODEL, live_server

from tuili.server import ServerConfig

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402 - schemathesis brings hypothesis
from hypothesis.errors import Unsatisfiable  # noqa: E402

EXAMPLES = int(os.environ.get("TUILI_FUZZ_EXAMPLES", "20"))
TIMEOUT = 30.0  # seconds any one response may take: longer is a hang
MODES = ("positive", "negative")


@pytest.fixture(scope="module")
def fuzzed(tiny_model):
    # limits as a cautious operator sets them, so that valid generated requests stay short
    config = ServerConfig(model_names=(MODEL,), max_tokens=32, request_timeout=TIMEOUT / 2)
    with live_server(tiny_model, config, block_size=4) as running:
        yield running


def served_model(case):
    """Valid bodies name the served model (else nearly all of them stop at the 404 for an unknown one)."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL
    return case


def fuzz(operation, mode: str, base: str, seen: Counter) -> None:
    """Up to EXAMPLES generated cases of one operation in one mode, each checked as it is answered."""

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)).map(served_model))
    def one(case):
        start = time.monotonic()
        response = case.call(base_url=base, timeout=TIMEOUT)
        seen[response.status_code] += 1
        label = f"{case.method} {case.path} ({mode})"
        assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:500]}"
        assert time.monotonic() - start < TIMEOUT, f"{label} took {time.monotonic() - start:.0f} s"
        if response.status_code >= 400:  # an OpenAI error object that says what is wrong
            assert response.json()["error"]["message"], label
        health = httpx.get(f"{base}/health", timeout=TIMEOUT)
        assert health.status_code == 200, f"after {label}: {health.text}"

    try:
        one()
    except Unsatisfiable:  # no invalid input exists where every input takes anything: GET /health has
        # none, GET /v1/models/{model} one string of any length
        anything = [set(p.definition.get("schema", {})) <= {"type", "title"} for p in operation.iter_parameters()]
        assert mode == "negative" and not operation.body and all(anything)


def test_every_endpoint_survives_schema_fuzzing(fuzzed):
    base, server = fuzzed
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    served = {
        f"{method} {route.path.replace(':path', '')}"  # OpenAPI drops Starlette's converters
        for route in server.app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    assert {f"{op.method.upper()} {op.path}" for op in operations} == served  # every endpoint is fuzzed
    counts: dict[str, Counter] = defaultdict(Counter)
    for operation in operations:
        for mode in MODES:
            fuzz(operation, mode, base, counts[f"{operation.method.upper()} {operation.path}"])
    assert server.llm.alive and server.llm.engine.stats()["kv_usage"] == 0
    report = os.environ.get("TUILI_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({endpoint: dict(c) for endpoint, c in counts.items()}, f, indent=1)
    bodies = [endpoint for endpoint in counts if endpoint.startswith("POST")]
    assert all(sum(counts[e].values()) >= EXAMPLES for e in bodies), counts  # bodies give room for every example
