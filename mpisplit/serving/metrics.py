"""Prometheus metrics of one server (its own registry: no global state)."""

from __future__ import annotations

from typing import Any

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
        self.queue_length = Gauge("mpisplit_queue_length", "Requests waiting to be admitted", registry=r)
        self.running = Gauge("mpisplit_running_sequences", "Sequences admitted (decoding, reading their prompt or preempted)", registry=r)
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

        self.kv_blocks_used = Gauge("mpisplit_kv_blocks_used", "KV-cache blocks held by sequences", registry=r)
        self.kv_blocks_free = Gauge(
            "mpisplit_kv_blocks_free", "KV-cache blocks a sequence can take (free or cached, held by none)", registry=r,
        )
        self.kv_blocks_cached = Gauge(
            "mpisplit_kv_blocks_cached", "KV-cache blocks named in the prefix cache (held or not)", registry=r,
        )
        self.prefix_queried = Counter(
            "mpisplit_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache", registry=r,
        )
        self.prefix_hits = Counter(
            "mpisplit_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (not computed)", registry=r,
        )
        self.prefix_hit_rate = Gauge(
            "mpisplit_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up, since start",
            registry=r,
        )
        self.preemptions = Counter(
            "mpisplit_preemptions", "Sequences preempted for want of KV blocks (recomputed later)", registry=r,
        )
        self.preempted = Gauge("mpisplit_preempted_sequences", "Sequences waiting for KV blocks again", registry=r)
        self._seen = (0, 0, 0)

    def observe_cache(self, engine: Any) -> None:
        """The KV-cache figures of `engine` after a step."""
        blocks = engine.blocks
        self.kv_blocks_used.set(blocks.used)
        self.kv_blocks_free.set(blocks.available)
        self.kv_blocks_cached.set(blocks.cached)
        self.preempted.set(len(engine.preempted))
        now = (blocks.queried_tokens, blocks.hit_tokens, engine.preemptions)
        for counter, new, old in zip((self.prefix_queried, self.prefix_hits, self.preemptions), now, self._seen):
            if new > old:
                counter.inc(new - old)
        self._seen = now
        if now[0]:
            self.prefix_hit_rate.set(now[1] / now[0])

    def render(self) -> bytes:
        return generate_latest(self.registry)
