"""Prometheus metrics of one server (`GET /metrics`).

Each app gets its own `CollectorRegistry`, never prometheus_client's global one, so several apps in one
process (tests, or one app per model) never share or double-register series.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets: a CPU toy model decodes in milliseconds, a d32 on a busy GPU can take seconds to the
# first token; both ends should land in real buckets.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    """The server's series. Gauges read the scheduler when scraped, so they are never stale."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "nanoctl_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("nanoctl_requests_in_flight", "HTTP requests being answered now", registry=r)
        self.queue_depth = Gauge(
            "nanoctl_queue_depth", "Generation requests waiting for rows or being prefilled", registry=r
        )
        self.active_rows = Gauge("nanoctl_active_rows", "Rows (samples) decoding now", registry=r)
        self.max_rows = Gauge(
            "nanoctl_max_rows", "Rows the schedulers can decode at once (--max-batch)", registry=r
        )
        self.ready = Gauge(
            "nanoctl_ready", "1 once the model is loaded and requests are admitted", registry=r
        )
        self.prompt_tokens = Counter(
            "nanoctl_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.generated_tokens = Counter(
            "nanoctl_generated_tokens",
            "Tokens generated (sampled, plus calculator output forced in)",
            registry=r,
        )
        self.finished = Counter(
            "nanoctl_choices_finished", "Choices (samples) finished, by finish reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "nanoctl_time_to_first_token_seconds", "From admission to a request's first token", registry=r,
            buckets=TTFT_BUCKETS,
        )  # fmt: skip
        self.itl = Histogram(
            "nanoctl_inter_token_latency_seconds", "Between consecutive tokens of one choice", registry=r,
            buckets=ITL_BUCKETS,
        )  # fmt: skip
        self.decode_steps = Counter("nanoctl_decode_steps", "Batched decode steps run", registry=r)

    def watch(
        self,
        queue_depth: Callable[[], float],
        active_rows: Callable[[], float],
        max_rows: Callable[[], float],
    ) -> None:
        """Read the gauges from the scheduler (or router) at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.active_rows.set_function(active_rows)
        self.max_rows.set_function(max_rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
