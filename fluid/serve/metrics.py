"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fluid_requests", "requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("fluid_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.tokens = Counter("fluid_generated_tokens", "tokens generated (committed)", registry=r)
        self.forwards = Counter("fluid_forwards", "decoding forwards of the batch", registry=r)
        self.row_forwards = Counter("fluid_row_forwards", "rows times forwards (a row's share of a forward)", registry=r)
        self.tpf = Gauge("fluid_tokens_per_forward", "generated tokens per row-forward since the start (TPF)",
                         registry=r)
        self.active_rows = Gauge("fluid_active_rows", "rows decoding now", registry=r)
        self.peak_rows = Gauge("fluid_peak_active_rows", "most rows one forward carried since the start", registry=r)
        self.queue_depth = Gauge("fluid_queue_depth", "requests waiting to join the batch", registry=r)
        self.batch_rows = Histogram("fluid_batch_rows", "rows per forward", buckets=ROW_BUCKETS, registry=r)
        self.ttft = Histogram("fluid_time_to_first_token_seconds", "from arrival to the first committed token",
                              buckets=TIME_BUCKETS, registry=r)
        self.latency = Histogram("fluid_request_latency_seconds", "from arrival to the last token",
                                 buckets=TIME_BUCKETS, registry=r)
        self._tokens = self._row_forwards = 0

    def forward(self, rows: int) -> None:
        self.forwards.inc()
        self.row_forwards.inc(rows)
        self.batch_rows.observe(rows)
        self._row_forwards += rows

    def update_tpf(self) -> None:
        tokens = self.tokens._value.get()
        self.tpf.set(tokens / self._row_forwards if self._row_forwards else 0.0)

    def render(self) -> bytes:
        self.update_tpf()
        return generate_latest(self.registry)
