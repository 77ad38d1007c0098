"""The server's Prometheus metrics, in a registry of its own (two apps in one process do not mix theirs).

    mistura_queue_length                      requests waiting for a place in the running batch
    mistura_running_sequences                 sequences in the running batch
    mistura_kv_blocks_used, _total            KV blocks held, and the pool's size
    mistura_kv_cached_tokens                  positions the used blocks hold
    mistura_generated_tokens_total            tokens generated so far
    mistura_generation_tokens_per_second      over the last 10 seconds
    mistura_preemptions_total                 sequences preempted to free blocks
    mistura_prefix_cache_hit_tokens_total     prompt tokens read from the prefix cache
    mistura_time_to_first_token_seconds       histogram, from the request's arrival to its first token
    mistura_requests_total{endpoint,status}   answered API requests (499: the client left first)

The engine's numbers are read from the runner's latest snapshot when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mistura.serve.runner import Runner

API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")


class Metrics:
    def __init__(self, runner: Runner):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(runner))
        self.time_to_first_token = Histogram(
            "mistura_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token",
            registry=self.registry,
        )
        self.requests = Counter(
            "mistura_requests",
            "API requests answered, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """The runner's view of the engine, read at each scrape."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def collect(self) -> Iterator[Metric]:
        stats = self.runner.stats
        gauges = (
            ("queue_length", "Requests waiting for a place in the running batch", self.runner.waiting),
            ("running_sequences", "Sequences in the running batch", stats.running),
            ("kv_blocks_used", "KV cache blocks held by sequences", stats.blocks_used),
            ("kv_blocks_total", "KV cache blocks in the pool", stats.blocks_total),
            ("kv_cached_tokens", "Positions the used KV blocks hold", stats.cached_tokens),
            ("generation_tokens_per_second", "Tokens generated per second, last 10 s", self.runner.tokens_per_second()),
        )
        for name, help, value in gauges:
            yield GaugeMetricFamily(f"mistura_{name}", help, value=value)
        counters = (
            ("generated_tokens", "Tokens generated", stats.generated_tokens),
            ("preemptions", "Sequences preempted to free KV blocks", stats.preemptions),
            ("prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache", stats.prefix_hit_tokens),
        )
        for name, help, value in counters:
            yield CounterMetricFamily(f"mistura_{name}", help, value=value)


class CountRequests:
    """ASGI middleware counting the answers of API_PATHS by endpoint and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in API_PATHS:
            await self.app(scope, receive, send)
            return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
