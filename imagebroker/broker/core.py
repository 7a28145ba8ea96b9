"""`AsyncBroker` holds a policy, the catalog as that policy sees it, providers and a ledger; `Broker`
is the same object driven from a private event-loop thread, so both paths share one core."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from ..errors import BudgetExceeded, ConfigError, NoRouteError
from ..policies.effective import effective_catalog
from ..policies.loader import load_policy
from ..policies.planner import PlannerState, plan
from ..policies.schema import Policy
from ..providers.base import ProgressCallback, Provider
from ..providers.catalog import Catalog, builtin_catalog
from ..providers.registry import provider_class
from ..types import ImageRequest, ImageResult, Plan
from .breaker import CircuitBreaker
from .budgets import period_key
from .execution import CallRun
from .ledger.store import Ledger

LATENCY_MIN_SAMPLES = 20
LATENCY_REFRESH_S = 30.0
LATENCY_WINDOW_S = 7 * 24 * 3600


def new_request_id() -> str:
    """Time-ordered (microseconds since the epoch, hex) plus 48 random bits."""
    return f"{time.time_ns() // 1000:014x}{secrets.token_hex(6)}"


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class AsyncBroker:
    """Routes requests by a policy, falls back on failure, and records every attempt and its cost."""

    def __init__(self, policy: str | Path | Policy | None = None, ledger: str | Ledger | None = None,
                 *, catalog: Catalog | None = None,
                 providers: Mapping[str, type[Provider]] | None = None) -> None:
        self.policy = load_policy(policy)
        self.catalog = effective_catalog(self.policy, catalog or builtin_catalog())
        self.ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger or self.policy.ledger.url)
        self._classes = dict(providers or {})
        self._providers: dict[str, Provider] = {}
        self.breaker = CircuitBreaker(self.policy.breaker.failure_threshold,
                                      self.policy.breaker.cooldown_s)
        self._latency: dict[str, tuple[float, float]] = {}
        self._latency_at = 0.0

    def __repr__(self) -> str:
        return f"<AsyncBroker policy={self.policy.name!r} ledger={self.ledger!r}>"

    # -- providers and state ----------------------------------------------------------------
    def provider(self, name: str) -> Provider:
        if name not in self._providers:
            cls = self._classes.get(name) or provider_class(name)
            self._providers[name] = cls(self.policy.provider(name), self.policy)
        return self._providers[name]

    def secrets(self) -> list[str | None]:
        return [p.api_key() for p in self._providers.values()]

    def _unavailable(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for o in self.catalog:
            if o.provider in out:
                continue
            try:
                provider = self.provider(o.provider)
            except ConfigError:
                out[o.provider] = f"provider {o.provider!r} is not installed"
                continue
            why = provider.availability(o)
            if why:
                out[o.id] = why
        return out

    def observed_latency(self) -> dict[str, tuple[float, float]]:
        now = time.monotonic()
        if now - self._latency_at > LATENCY_REFRESH_S:
            by: dict[str, list[float]] = {}
            for offering, latency in self.ledger.recent_latencies(time.time() - LATENCY_WINDOW_S):
                by.setdefault(offering, []).append(latency)
            self._latency = {o: (round(_percentile(v, 0.5), 3), round(_percentile(v, 0.95), 3))
                             for o, v in by.items() if len(v) >= LATENCY_MIN_SAMPLES}
            self._latency_at = now
        return self._latency

    def _headroom(self) -> Decimal | None:
        restrict = [b for b in self.policy.budgets if b.on_exceed == "restrict"
                    and not b.scope.tags and not b.scope.provider and not b.scope.offering]
        if not restrict:
            return None
        keys = [(b.name, period_key(b.period)) for b in restrict]
        counters = self.ledger.counters(keys)
        return min(b.limit_usd - sum(counters[(b.name, period_key(b.period))])
                   for b in restrict)

    def state(self, today: date | None = None) -> PlannerState:
        local = self._providers.get("local") or (
            self.provider("local") if any(o.provider == "local" for o in self.catalog) else None)
        warm = frozenset(o.id for o in self.catalog if o.kind == "local" and local is not None
                         and local.is_warm(o))
        device = getattr(local, "device_kind", lambda: "cuda")() if local else "cuda"
        return PlannerState(today=today or datetime.now(UTC).date(),
                            unavailable=self._unavailable(), observed_latency=self.observed_latency(),
                            warm=warm, local_device=device, max_marginal_usd=self._headroom())

    # -- the API ----------------------------------------------------------------------------
    def plan(self, request: ImageRequest | str | None = None, /, **fields: Any) -> Plan:
        return plan(_request(request, fields), self.policy, self.catalog, self.state())

    async def generate(self, request: ImageRequest | str | None = None, /, *,
                       progress: ProgressCallback | None = None, **fields: Any) -> ImageResult:
        req = _request(request, fields)
        request_id = new_request_id()
        the_plan = plan(req, self.policy, self.catalog, self.state())
        run = CallRun(self, req, the_plan, request_id, progress)
        if not the_plan.candidates:
            error = NoRouteError(f"no offering can serve this request under policy "
                                 f"{self.policy.name!r}", the_plan.rejected)
            run._record("rejected", error=error)
            raise error
        return await run.run()

    async def aclose(self) -> None:
        for p in self._providers.values():
            await p.aclose()
        self._providers.clear()

    async def __aenter__(self) -> AsyncBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _request(request: ImageRequest | str | None, fields: dict[str, Any]) -> ImageRequest:
    if isinstance(request, ImageRequest):
        return request.model_copy(update=fields) if fields else request
    if isinstance(request, str):
        fields = dict(fields, prompt=request)
    return ImageRequest(**fields)


class Broker:
    """The synchronous face of `AsyncBroker`: the same core, run on a private event-loop thread."""

    def __init__(self, policy: str | Path | Policy | None = None, ledger: str | Ledger | None = None,
                 **kw: Any) -> None:
        self._async = AsyncBroker(policy, ledger, **kw)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="imagebroker",
                                        daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<Broker policy={self.policy.name!r} ledger={self.ledger!r}>"

    @property
    def policy(self) -> Policy:
        return self._async.policy

    @property
    def ledger(self) -> Ledger:
        return self._async.ledger

    @property
    def catalog(self) -> Catalog:
        return self._async.catalog

    def plan(self, request: ImageRequest | str | None = None, /, **fields: Any) -> Plan:
        return self._async.plan(request, **fields)

    def generate(self, request: ImageRequest | str | None = None, /, *,
                 progress: ProgressCallback | None = None, **fields: Any) -> ImageResult:
        coro = self._async.generate(request, progress=progress, **fields)
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._async.aclose(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncBroker", "Broker", "BudgetExceeded", "new_request_id"]
