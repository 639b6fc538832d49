"""Prometheus metrics of one server, in its own registry (so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tte_requests", "Requests to /v1/embeddings, by HTTP status.", ["status"], registry=r)
        self.items = Counter("tte_items", "Items embedded, by who answered: engine, trace_cache (trace re-used) or embedding_cache.", ["source"], registry=r)
        self.tokens = Counter("tte_tokens", "Tokens by phase: prompt, trace (generated), cached_trace (re-used), embed (suffix).", ["phase"], registry=r)
        self.queue_depth = Gauge("tte_queue_depth", "Items accepted and waiting for a place in the engine's batch.", registry=r)
        self.running = Gauge("tte_running_items", "Items the engine has started and not finished.", registry=r)
        self.media_bytes = Gauge("tte_media_bytes", "Bytes of preprocessed images and videos held by requests in flight "
                                 "(at most tte-serve --max-media-bytes).", registry=r)
        self.batch_size = Histogram("tte_batch_size", "Sequences in each engine step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.steps = Counter("tte_engine_steps", "Engine steps run.", registry=r)
        # vLLM's pair: hit rate = rate(hits) / rate(queries)
        self.prefix_cache_queries = Counter("tte_prefix_cache_queries", "Prompt KV blocks looked up in the prefix cache.", registry=r)
        self.prefix_cache_hits = Counter("tte_prefix_cache_hits", "Prompt KV blocks found in the prefix cache.", registry=r)
        self.prefix_cache_hit_rate = Gauge("tte_prefix_cache_hit_rate", "Blocks found / looked up in the prefix cache since start.", registry=r)
        self.latency = Histogram(
            "tte_latency_seconds",
            "Latency by phase: validate (parse, tokenize, images, cache look-up), queue (until the engine starts the item), "
            "think (trace generation), embed (suffix prefill and pooling), request (the whole HTTP request).",
            ["phase"], buckets=_LATENCY_BUCKETS, registry=r,
        )
