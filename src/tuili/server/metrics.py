"""Prometheus metrics (prometheus-client), named like vLLM's where they mean the same thing.

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


class _EngineCollector(Collector):
    """The engine's own state, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict[str, float]]):
        self.stats = stats

    def collect(self) -> Iterator:
        s = self.stats()
        policy = (
            ("max_num_seqs", "Requests the engine runs at once; the rest wait in the queue"),
            ("max_num_batched_tokens", "Tokens one engine step may carry"),
            ("target_itl", "Seconds a step with decodes should take (0: no pacing, throughput first)"),
            ("max_queue_time", "Seconds a request may wait to start before a 503 (0: no limit)"),
            ("prefill_budget", "Prompt tokens the next step may carry beside the running decodes"),
            ("decode_step_seconds", "Measured seconds of a decode-only step (recent steps weighted most)"),
            ("prefill_token_seconds", "Measured seconds one prompt token adds to a step"),
        )
        for key, help_text in policy:
            yield GaugeMetricFamily(f"tuili_scheduler_{key}", help_text, value=s[key])
        yield GaugeMetricFamily("tuili_num_requests_running", "Requests in the running batch", value=s["running"])
        yield GaugeMetricFamily("tuili_num_requests_waiting", "Requests waiting to be scheduled", value=s["waiting"])
        yield GaugeMetricFamily(
            "tuili_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)", value=s["kv_usage"]
        )
        yield GaugeMetricFamily("tuili_kv_cache_blocks", "KV-cache blocks in all", value=s["kv_blocks_total"])
        yield GaugeMetricFamily(
            "tuili_prefix_cache_blocks",
            "KV blocks held only by the prefix cache (reusable)",
            value=s["kv_cached_blocks"],
        )
        yield CounterMetricFamily(
            "tuili_prefix_cache_queries", "Prompt blocks looked up in the prefix cache", value=s["prefix_cache_queries"]
        )
        yield CounterMetricFamily(
            "tuili_prefix_cache_hits", "Prompt blocks found in the prefix cache", value=s["prefix_cache_hits"]
        )
        yield CounterMetricFamily(
            "tuili_num_preemptions", "Requests preempted for KV-cache room", value=s["preemptions"]
        )


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict[str, float]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tuili_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("tuili_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("tuili_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter(
            "tuili_request_success", "Generation requests finished, by reason", ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "tuili_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "tuili_inter_token_latency_seconds",
            "Time between consecutive output tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tuili_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_timeouts = Counter(
            "tuili_request_queue_timeouts", "Requests refused (503) after waiting past max_queue_time", registry=r
        )
        self.queue = Histogram(
            "tuili_request_queue_time_seconds", "Arrival to first scheduled", buckets=_LATENCY_BUCKETS, registry=r
        )
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
