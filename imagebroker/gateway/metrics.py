"""`GET /metrics`: Prometheus text (prometheus-client) for one worker process: calls, images and cost by
offering and status, call latency histograms, and each provider's circuit breaker. Several workers each
answer for themselves (scrape each, or sum them in Prometheus)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from ..broker.core import AsyncBroker
    from ..types import ImageResult

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter("imagebroker_calls", "Gateway calls by the offering that served them (or was tried "
                             "last) and their status.", ("offering", "status"), registry=self.registry)
        self.images = Counter("imagebroker_images", "Images returned.", ("offering",), registry=self.registry)
        self.cost = Counter("imagebroker_cost_usd", "What the calls cost (priced and estimated), in USD.",
                            ("offering", "cost_status"), registry=self.registry)
        self.latency = Histogram("imagebroker_call_latency_seconds", "Call latency, fallbacks included.",
                                 ("offering", "status"), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.breaker = Gauge("imagebroker_breaker_open", "1 while a provider's circuit breaker skips it.",
                             ("provider",), registry=self.registry)

    def served(self, result: ImageResult) -> None:
        self.calls.labels(result.offering, "ok").inc()
        self.images.labels(result.offering).inc(len(result.images))
        if result.cost.usd is not None:
            self.cost.labels(result.offering, result.cost.status).inc(float(result.cost.usd))
        self.latency.labels(result.offering, "ok").observe(result.latency_s)

    def failed(self, offering: str | None, status: int, latency_s: float) -> None:
        label = str(status)
        self.calls.labels(offering or "(none)", label).inc()
        self.latency.labels(offering or "(none)", label).observe(latency_s)

    async def render(self, broker: AsyncBroker) -> bytes:
        for provider in broker.catalog.providers():
            self.breaker.labels(provider).set(1 if await broker.shared_state.is_open(provider) else 0)
        return generate_latest(self.registry)
