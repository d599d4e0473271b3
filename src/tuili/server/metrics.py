"""Prometheus metrics (prometheus-client), named like vLLM's where they mean the same thing: under
a `tuili_` prefix, or with `names="vllm"` (`tuili serve --metrics-names vllm`) under vLLM's own
`vllm:` prefix with its `model_name` label, so that vLLM's Grafana dashboards read them unchanged.

Counters and histograms are recorded by the request handlers; the engine's gauges (running and
waiting requests, KV-cache usage, prefix-cache hits) are read from `AsyncLLM.stats()` at each scrape.
Each server has its own registry, so several can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)


# the engine's gauges and counters: (kind, name, help, key in AsyncLLM.stats())
_ENGINE = (
    *(
        (GaugeMetricFamily, f"scheduler_{key}", text, key)
        for key, text in (
            ("max_num_seqs", "Requests the engine runs at once; the rest wait in the queue"),
            ("max_num_batched_tokens", "Tokens one engine step may carry"),
            ("target_itl", "Seconds a step with decodes should take (0: no pacing, throughput first)"),
            ("max_queue_time", "Seconds a request may wait to start before a 503 (0: no limit)"),
            ("prefill_budget", "Prompt tokens the next step may carry beside the running decodes"),
            ("decode_step_seconds", "Measured seconds of a decode-only step (recent steps weighted most)"),
            ("prefill_token_seconds", "Measured seconds one prompt token adds to a step"),
        )
    ),
    (GaugeMetricFamily, "num_requests_running", "Requests in the running batch", "running"),
    (GaugeMetricFamily, "num_requests_waiting", "Requests waiting to be scheduled", "waiting"),
    (GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)", "kv_usage"),
    (GaugeMetricFamily, "kv_cache_blocks", "KV-cache blocks in all", "kv_blocks_total"),
    (
        GaugeMetricFamily,
        "prefix_cache_blocks",
        "KV blocks held only by the prefix cache (reusable)",
        "kv_cached_blocks",
    ),
    (
        CounterMetricFamily,
        "prefix_cache_queries",
        "Prompt blocks looked up in the prefix cache",
        "prefix_cache_queries",
    ),
    (CounterMetricFamily, "prefix_cache_hits", "Prompt blocks found in the prefix cache", "prefix_cache_hits"),
    (CounterMetricFamily, "num_preemptions", "Requests preempted for KV-cache room", "preemptions"),
    # speculative decoding, where it is on (vLLM's names)
    (CounterMetricFamily, "spec_decode_num_drafts", "Speculative steps: drafts checked together", "spec_steps"),
    (CounterMetricFamily, "spec_decode_num_draft_tokens", "Draft tokens checked", "spec_draft_tokens"),
    (CounterMetricFamily, "spec_decode_num_accepted_tokens", "Draft tokens accepted", "spec_accepted_tokens"),
)


class _EngineCollector(Collector):
    """The engine's own state, read when Prometheus scrapes, under the constant labels if any."""

    def __init__(self, stats: Callable[[], dict[str, float]], prefix: str, labels: dict[str, str]):
        self.stats, self.prefix, self.labels = stats, prefix, labels

    def collect(self) -> Iterator:
        s = self.stats()
        for kind, name, text, key in _ENGINE:
            if key not in s:  # speculative decoding's, with it off
                continue
            family = kind(self.prefix + name, text, labels=list(self.labels))
            family.add_metric(list(self.labels.values()), s[key])
            yield family


class _Labelled:
    """A metric with constant labels first (vLLM's model_name), then its own, if any."""

    def __init__(self, metric, constant: tuple[str, ...]):
        self.metric, self.constant = metric, constant

    def labels(self, *values: str):
        return self.metric.labels(*self.constant, *values)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict[str, float]], names: str = "tuili", model_name: str = ""):
        if names not in ("tuili", "vllm"):
            raise ValueError(f"metric names are 'tuili' or 'vllm', got {names!r}")
        self.registry = CollectorRegistry()
        r = self.registry
        prefix, constant = ("vllm:", {"model_name": model_name}) if names == "vllm" else ("tuili_", {})

        def make(kind, name: str, doc: str, labels: tuple[str, ...] = (), **options):
            metric = kind(prefix + name, doc, [*constant, *labels], registry=r, **options)
            if not constant:
                return metric
            return _Labelled(metric, tuple(constant.values())) if labels else metric.labels(*constant.values())

        latency = {"buckets": _LATENCY_BUCKETS}
        self.requests = make(Counter, "http_requests", "HTTP requests by endpoint and status", ("endpoint", "status"))
        self.prompt_tokens = make(Counter, "prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = make(Counter, "generation_tokens", "Tokens generated")
        self.finished = make(
            Counter, "request_success", "Generation requests finished, by reason", ("finished_reason",)
        )
        self.ttft = make(Histogram, "time_to_first_token_seconds", "Arrival to first token", **latency)
        self.itl = make(Histogram, "inter_token_latency_seconds", "Time between consecutive output tokens", **latency)
        self.e2e = make(Histogram, "e2e_request_latency_seconds", "Arrival to last token", **latency)
        self.queue_timeouts = make(
            Counter, "request_queue_timeouts", "Requests refused (503) after waiting past max_queue_time"
        )
        self.queue = make(Histogram, "request_queue_time_seconds", "Arrival to first scheduled", **latency)
        r.register(_EngineCollector(engine_stats, prefix, constant))

    def render(self) -> bytes:
        return generate_latest(self.registry)
