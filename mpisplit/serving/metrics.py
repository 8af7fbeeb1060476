"""Prometheus metrics of one server (its own registry: no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self, max_batch: int) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "mpisplit_requests", "Completion requests by outcome", ["outcome"], registry=r,
        )
        self.prompt_tokens = Counter("mpisplit_prompt_tokens", "Prompt tokens read", registry=r)
        self.generated_tokens = Counter("mpisplit_generated_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("mpisplit_queue_length", "Requests waiting for a KV-cache slot", registry=r)
        self.running = Gauge("mpisplit_running_sequences", "Sequences in KV-cache slots", registry=r)
        self.batch_occupancy = Histogram(
            "mpisplit_batch_occupancy", "Sequences per engine step", registry=r,
            buckets=tuple(range(1, max_batch + 1)),
        )
        self.ttft = Histogram(
            "mpisplit_time_to_first_token_seconds", "From request arrival to its first token",
            registry=r, buckets=LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "mpisplit_inter_token_latency_seconds", "Between consecutive tokens of one request",
            registry=r, buckets=LATENCY_BUCKETS,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
