"""`AsyncBroker` holds a policy, the catalog as that policy sees it, providers and a ledger; `Broker`
is the same object driven from a private event-loop thread, so both paths share one core."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from ..errors import BudgetExceeded, CallTimedOut, ConfigError, DuplicateRequest, RequestError
from ..logs import known_secrets, logger
from ..policies.check import check_names
from ..policies.effective import effective_catalog
from ..policies.loader import load_policy
from ..policies.planner import PlannerState, plan, request_key
from ..policies.schema import Budget, Policy
from ..providers.base import AttemptCallback, ProgressCallback, Provider
from ..providers.catalog import Catalog, builtin_catalog
from ..providers.registry import provider_class, provider_names
from ..types import ImageRequest, ImageResult, Plan
from .budgets import period_key
from .cache import replay
from .execution import CallView, execute
from .images import STORE_ENV, ImageStore
from .ledger.lookups import ServedCall
from .ledger.store import Ledger
from .retries import RetryRules
from .shared import shared_state

LATENCY_MIN_SAMPLES = 20
LATENCY_REFRESH_S = 30.0
LATENCY_WINDOW_S = 7 * 24 * 3600
UNAVAILABLE_REFRESH_S = 1.0
PLAN_CACHE_SIZE = 1024
IDEMPOTENCY_TTL_S = 24 * 3600
IDEMPOTENCY_MEMORY = 256  # results kept per broker, for repeats of a key
CLAIM_TTL_S = 15.0        # a shared claim on a key under way lapses this long after its worker stops
CLAIM_POLL_S = 0.05       # how often a repeat of a key another worker is calling looks again


def new_request_id() -> str:
    """Time-ordered (microseconds since the epoch, hex) plus 48 random bits. Not a secret, so not from
    the `secrets` module: its system call would release the GIL on every request."""
    return f"{time.time_ns() // 1000:014x}{random.getrandbits(48):012x}"  # random reseeds after fork


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _differs(served: ServedCall, req: ImageRequest) -> bool:
    """Whether the call a key was served by stands for another request than `req` (what its row keeps)."""
    inputs = tuple(i.sha256 for i in (*req.images, *([req.mask] if req.mask else [])))
    return (served.prompt_sha256 != req.prompt_sha256() or served.n != req.n or served.seed != req.seed
            or (req.width is not None and (served.width, served.height) != (req.width, req.height))
            or served.input_sha256s != inputs)


def _store(store: bool | str | ImageStore | None, policy: Policy) -> ImageStore | None:
    if isinstance(store, ImageStore):
        return store
    settings = policy.store
    if store is None:
        wanted = settings.enabled if settings.enabled is not None else bool(settings.url or os.environ.get(STORE_ENV))
        return ImageStore(settings.url) if wanted else None
    if store is False or settings.enabled is False:
        return None
    return ImageStore(store if isinstance(store, str) else settings.url)


class AsyncBroker:
    """Routes requests by a policy, falls back on failure, and records every attempt and its cost."""

    def __init__(self, policy: str | Path | Policy | None = None, ledger: str | Ledger | None = None,
                 *, catalog: Catalog | None = None,
                 providers: Mapping[str, type[Provider]] | None = None,
                 store: bool | str | ImageStore | None = None) -> None:
        """`store`: where images are kept (`broker/images.py`): None follows the policy's `store:` section
        (on when it is enabled or names a URL, or $IMAGEBROKER_STORE_URL is set), True the default folder,
        False none, or a URL or an ImageStore."""
        self.policy = load_policy(policy)
        self.catalog = effective_catalog(self.policy, catalog or builtin_catalog())
        check_names(self.policy, self.catalog, [*provider_names(), *(providers or {})])
        self.ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger or self.policy.ledger.url)
        self._classes = dict(providers or {})
        self._providers: dict[str, Provider] = {}
        self._stateful: list[Provider] = []  # providers whose `state_epoch` is their own
        self.shared_state = shared_state(self.policy)   # breakers, rate limits, keys under way (Redis if set)
        self._latency: dict[str, tuple[float, float]] = {}
        self._latency_at = -LATENCY_REFRESH_S
        self._unavail: dict[str, str] = {}
        self._unavail_at, self._env_size = -UNAVAILABLE_REFRESH_S, -1
        self._state: PlannerState | None = None
        self._plans: dict[tuple[object, ...], Plan] = {}
        self._cold: frozenset[str] = frozenset()
        self._devices: dict[str, str] = {}
        self._epoch = -1
        self.in_flight = 0  # generate() calls under way on this broker
        self.store = _store(store, self.policy)
        self._view = self._call_view()
        self._keyed: dict[str, tuple[ImageRequest, asyncio.Future[ImageResult], float]] = {}  # oldest first

    def __repr__(self) -> str:
        return f"<AsyncBroker policy={self.policy.name!r} ledger={self.ledger!r}>"

    def _call_view(self) -> CallView:
        return CallView(self.policy, self.catalog, self.ledger, self.provider, self.shared_state, self.secrets,
                        lambda: self.in_flight > 1, RetryRules.of(self.policy.retry), self.store)

    def add_budgets(self, budgets: Iterable[Budget]) -> None:
        """Budgets beyond the policy's (a gateway key's own), reserved and enforced exactly as the policy's are;
        one already known by name is left as it is."""
        known = {b.name for b in self.policy.budgets}
        new = tuple(b for b in budgets if b.name not in known)
        if new:
            self.policy = self.policy.model_copy(update={"budgets": (*self.policy.budgets, *new)})
            self._view = self._call_view()
            self._plans.clear()

    # -- providers and state ----------------------------------------------------------------
    def provider(self, name: str) -> Provider:
        if name not in self._providers:
            cls = self._classes.get(name) or provider_class(name)
            provider = self._providers[name] = cls(self.policy.provider(name))
            provider.connect(self.provider, self.catalog)
            if type(provider).state_epoch is not Provider.state_epoch:  # its state can change at any time
                self._stateful.append(provider)
        return self._providers[name]

    def secrets(self) -> list[str]:
        """Every credential a provider has read in this process (`logs.remember_secret`): masked in
        whatever the ledger stores or an error says."""
        return known_secrets()

    def _offering_states(self) -> dict[str, str]:
        """Asks every provider about its offerings (`Provider.state`): offering (or provider) -> why it
        cannot be called now, and which must load first and on what device. Asked again at once when
        environment variables come or go (an API key set in a notebook) or a provider says its state
        changed (`state_epoch`: a model loaded), else at most once a second (it stats files, reads
        variables). Returns the unavailable map: a new object only when something changed, so that
        plans stay memoised."""
        now, env_size = time.monotonic(), len(os.environ)
        epoch = sum(p.state_epoch for p in self._stateful)
        if (env_size == self._env_size and epoch == self._epoch
                and now - self._unavail_at < UNAVAILABLE_REFRESH_S):
            return self._unavail
        out: dict[str, str] = {}
        cold, devices = set(), {}
        for o in self.catalog:
            if o.provider in out:
                continue
            try:
                provider = self.provider(o.provider)
            except ConfigError:
                out[o.provider] = f"provider {o.provider!r} is not installed"
                continue
            state = provider.state(o)
            if state.unavailable:
                out[o.id] = state.unavailable
            if not state.warm:
                cold.add(o.id)
            if state.device:
                devices[o.id] = state.device
        if out != self._unavail:
            self._unavail = out
        if cold != self._cold:
            self._cold = frozenset(cold)
        if devices != self._devices:
            self._devices = devices
        self._unavail_at, self._env_size = now, env_size
        self._epoch = sum(p.state_epoch for p in self._stateful)  # (with the providers made just now)
        return self._unavail

    def observed_latency(self) -> dict[str, tuple[float, float]]:
        now = time.monotonic()
        if now - self._latency_at > LATENCY_REFRESH_S:
            by: dict[str, list[float]] = {}
            try:
                recent = self.ledger.recent_latencies(time.time() - LATENCY_WINDOW_S)
            except Exception as exc:  # a hint for the planner: keep the last one rather than fail the call
                logger.warning("could not read recent latencies from the ledger: %s", type(exc).__name__)
                self._latency_at = now
                return self._latency
            for offering, latency in recent:
                by.setdefault(offering, []).append(latency)
            latency = {o: (round(_percentile(v, 0.5), 3), round(_percentile(v, 0.95), 3))
                       for o, v in by.items() if len(v) >= LATENCY_MIN_SAMPLES}
            if latency != self._latency:
                self._latency = latency
            self._latency_at = now
        return self._latency

    def _headroom(self) -> Decimal | None:
        restrict = [b for b in self.policy.budgets if b.on_exceed == "restrict"
                    and not b.scope.tags and not b.scope.provider and not b.scope.offering]
        if not restrict:
            return None
        keys = [(b.name, period_key(b.period)) for b in restrict]
        try:
            counters = self.ledger.counters(keys)
        except Exception as exc:  # the reservation still checks the budget: plan without the headroom
            logger.warning("could not read budget counters for planning: %s", type(exc).__name__)
            return None
        return min(b.limit_usd - sum(counters[(b.name, period_key(b.period))])
                   for b in restrict)

    def state(self, today: date | None = None) -> PlannerState:
        """What the planner needs to know of the world now. The same object comes back while nothing
        in it changed, which is what lets `_plan` memoise."""
        unavailable, latency = self._offering_states(), self.observed_latency()  # new objects when changed
        today, headroom = today or datetime.now(UTC).date(), self._headroom()
        s = self._state
        if (s is None or s.unavailable is not unavailable or s.observed_latency is not latency
                or s.cold is not self._cold or s.devices is not self._devices
                or (s.today, s.max_marginal_usd) != (today, headroom)):
            self._plans.clear()
            self._state = PlannerState(today=today, unavailable=unavailable, observed_latency=latency,
                                       cold=self._cold, devices=self._devices, max_marginal_usd=headroom)
        return self._state

    def _plan(self, request: ImageRequest) -> Plan:
        """`planner.plan`, memoised by the request's planning fields while the state is unchanged."""
        state = self.state()
        key = request_key(request)
        found = self._plans.get(key)
        if found is None:
            found = plan(request, self.policy, self.catalog, state)
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            if self._state is state:  # (the sync Broker plans from the caller's thread too)
                self._plans[key] = found
        return found

    # -- the API ----------------------------------------------------------------------------
    def plan(self, request: ImageRequest | str | None = None, /, **fields: Any) -> Plan:
        return self._plan(_request(request, fields))

    async def generate(self, request: ImageRequest | str | None = None, /, *,
                       progress: ProgressCallback | None = None, on_attempt: AttemptCallback | None = None,
                       timeout: float | None = None, **fields: Any) -> ImageResult:
        """`progress(step, total)` is called as a local pipeline denoises; `on_attempt(offering, number)`
        before each try of a provider (what a progress display shows while it waits). `timeout` (seconds)
        bounds the whole call, fallbacks included: past it the call is cancelled, recorded `cancelled`,
        and `CallTimedOut` raised (with an `idempotency_key` only the waiting stops: the call goes on)."""
        req = _request(request, fields)
        if timeout is not None and not timeout > 0:
            raise RequestError(f"timeout must be a positive number of seconds, not {timeout!r}")
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                if req.idempotency_key is None:
                    return await self._generate(req, progress, on_attempt)
                return await self._once(req, req.idempotency_key, progress, on_attempt)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise CallTimedOut(f"the call ran past its timeout of {timeout:g} s and was cancelled") from None

    async def _once(self, req: ImageRequest, key: str, progress: ProgressCallback | None,
                    on_attempt: AttemptCallback | None) -> ImageResult:
        """At most one paid call per idempotency key: a repeat waits for the call under way or gets
        its result again (this broker remembers the last few hundred for a day); a key another
        process already served is answered again from the image store, or raises DuplicateRequest
        without it; a key another worker is calling now (shared state) waits for that call's row.
        A failed call is not remembered: a repeat tries again. The call runs as a task of its own, so a
        caller that gives up (a timeout of theirs) does not cancel it, and their retry with the same key
        gets its result."""
        known = self._keyed.get(key)
        if known is not None:
            if known[0] != req:
                raise RequestError(f"idempotency_key {key!r} was used for a different request; a key "
                                   "stands for one request")
            if time.time() - known[2] > IDEMPOTENCY_TTL_S:
                known = None  # too old to stand for this one
        if known is None:
            owner = uuid.uuid4().hex
            while True:   # the ledger knows what was served; the shared state what is being served
                if (done := await self._served_before(key, req)) is not None:
                    return done
                if await self.shared_state.claim(key, owner, CLAIM_TTL_S):
                    if self.shared_state.shared and (done := await self._served_before(key, req)) is not None:
                        # it ended between the look and the claim
                        await self.shared_state.unclaim(key, owner)
                        return done
                    break
                while await self.shared_state.claimed(key):   # another worker is calling it: wait for its row
                    await asyncio.sleep(CLAIM_POLL_S)
                if (known := self._keyed.get(key)) is not None:   # a call of this process began meanwhile
                    return await asyncio.shield(known[1])
            task = asyncio.ensure_future(self._claimed(req, key, owner, progress, on_attempt))
            self._keyed.pop(key, None)  # (an expired entry) the new one goes to the end, the newest
            known = self._keyed[key] = (req, task, time.time())
            task.add_done_callback(lambda t: self._forget_failed(key, t))
            while len(self._keyed) > IDEMPOTENCY_MEMORY:
                self._keyed.pop(next(iter(self._keyed)))
        return await asyncio.shield(known[1])

    async def _served_before(self, key: str, req: ImageRequest) -> ImageResult | None:
        """The call the ledger says `key` was served by, answered again from the image store; None when it was
        not served; DuplicateRequest when it was but its images are not here to answer with."""
        served = await self.ledger.off_loop(self.ledger.served, key, time.time() - IDEMPOTENCY_TTL_S)
        if served is None:
            return None
        if _differs(served, req):
            raise RequestError(f"idempotency_key {key!r} was used for a different request (call "
                               f"{served.request_id}); a key stands for one request")
        replayed = replay(self.store, served, self._plan(req)) if self.store is not None else None
        if replayed is not None:   # the same request id and bytes, from the image store
            return replayed
        rid, hashes = served.request_id, served.image_sha256s
        when = datetime.fromtimestamp(served.created_at, UTC).isoformat(timespec="seconds")
        raise DuplicateRequest(
            f"idempotency_key {key!r} was served by request {rid} at {when} (images "
            f"{', '.join(h[:12] for h in hashes)}); its images are not in this broker's image store, so "
            "it cannot be answered again without paying again: use a new key to generate anew", rid)

    async def _claimed(self, req: ImageRequest, key: str, owner: str, progress: ProgressCallback | None,
                       on_attempt: AttemptCallback | None) -> ImageResult:
        """The call of a key this process claimed; with shared state the claim is kept alive while it runs
        (a worker that dies lets it lapse within CLAIM_TTL_S) and given up once its row is written."""
        if not self.shared_state.shared:
            return await self._generate(req, progress, on_attempt)
        keeper = asyncio.ensure_future(self._keep_claim(key, owner))
        try:
            return await self._generate(req, progress, on_attempt)
        finally:
            keeper.cancel()
            await self.shared_state.unclaim(key, owner)

    async def _keep_claim(self, key: str, owner: str) -> None:
        while True:
            await asyncio.sleep(CLAIM_TTL_S / 3)
            await self.shared_state.extend(key, owner, CLAIM_TTL_S)

    def _forget_failed(self, key: str, task: asyncio.Future[ImageResult]) -> None:
        entry = self._keyed.get(key)
        if entry is not None and entry[1] is task and (task.cancelled() or task.exception() is not None):
            del self._keyed[key]

    async def _generate(self, req: ImageRequest, progress: ProgressCallback | None,
                        on_attempt: AttemptCallback | None) -> ImageResult:
        the_plan = self._plan(req)
        self.in_flight += 1
        try:
            return await execute(self._view, req, the_plan, new_request_id(), progress, on_attempt)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        for p in self._providers.values():
            await p.aclose()
        self._providers.clear()
        self._stateful.clear()
        await self.shared_state.aclose()
        self.ledger.writer.flush_backlog()  # rows that could not be written when their call ended

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


__all__ = ["AsyncBroker", "BudgetExceeded", "new_request_id"]
