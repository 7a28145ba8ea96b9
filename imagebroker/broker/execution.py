"""Walking a plan: per offering, reserve budget, try (with retries), validate, settle, record.

Fallback never leaves the plan, so every attempt satisfies the policy's hard constraints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from ..errors import (
    AllAttemptsFailed,
    BudgetExceeded,
    LedgerError,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    redact,
)
from ..policies.pricing import settle
from ..providers.base import CallContext, ProgressCallback, ProviderResult
from ..providers.offering import Offering
from ..types import Attempt, Candidate, Cost, GeneratedImage, ImageRequest, ImageResult, Plan
from .budgets import applicable
from .ledger.schema import to_nusd
from .validate import validate_images

if TYPE_CHECKING:
    from .core import AsyncBroker


OFFLOAD_BYTES = 256 * 1024  # images larger than this in all are decoded (and hashed) on a worker thread
_Success = tuple[Offering, Candidate, ProviderResult, tuple[GeneratedImage, ...], Cost]


class _Done(Exception):
    """Internal: one offering succeeded."""


class CallRun:
    """One `generate()` call: its attempts, reservation and ledger rows."""

    def __init__(self, broker: AsyncBroker, request: ImageRequest, plan: Plan, request_id: str,
                 progress: ProgressCallback | None) -> None:
        self.b, self.request, self.plan, self.request_id = broker, request, plan, request_id
        self.progress = progress
        self.attempts: list[Attempt] = []
        self.started = time.time()
        self.t0 = time.perf_counter()
        self.pending_row = False
        self.budget_error: BudgetExceeded | None = None  # the last `restrict` refusal, if any
        self.result: _Success | None = None
        self.recorded = False

    async def run(self) -> ImageResult:
        policy = self.b.policy
        limit = policy.fallback.max_offerings if policy.fallback.enabled else 1
        try:
            for cand in self.plan.candidates[:limit]:
                offering = self.b.catalog.offerings[cand.offering]
                if not self.b.breaker.allow(offering.provider):
                    self._note(offering, "CircuitOpen", "provider skipped: circuit open after "
                               "repeated failures", 0.0)
                    continue
                if await self._try_offering(cand, offering):
                    return await self._finish_ok()
            if self.budget_error is not None and not any(a.status == "error" and a.error_type not in (
                    "BudgetExceeded", "CircuitOpen") for a in self.attempts):
                raise self.budget_error  # nothing was tried: every candidate was over budget
        except BudgetExceeded as exc:
            await self.record("rejected", error=exc)
            raise
        except asyncio.CancelledError:  # the caller gave up (a timeout of theirs, a shutdown)
            if not self.recorded:
                with contextlib.suppress(Exception):  # the cancellation is what the caller must see
                    self.b.ledger.record_call(*self._rows("cancelled", None), pending=self.pending_row)
            raise
        error = AllAttemptsFailed(self.attempts)
        await self.record("error", error=error)
        raise error

    # -- one offering --------------------------------------------------------------------------
    async def _try_offering(self, cand: Candidate, offering: Offering) -> bool:
        limits = [(b.name, period, b.limit_usd)
                  for b, period in applicable(self.b.policy.budgets, self.request, offering)]
        reservation = None
        if limits:
            amount = cand.estimated_cost.usd
            if amount is None:
                self._note(offering, "BudgetExceeded", "price unknown, so the budget cannot be "
                           "checked; offering skipped", 0.0)
                return False
            restrict = any(b.on_exceed == "restrict" for b in self.b.policy.budgets)
            try:
                reservation = self.b.ledger.reserve(self.request_id, limits, amount,
                                                    self.b.policy.ledger.reservation_ttl_s)
            except BudgetExceeded as exc:
                if restrict:
                    self.budget_error = exc
                    return False
                raise
            if not self.pending_row:
                self.b.ledger.start_call(self._call_row("pending", None))
                self.pending_row = True
        try:
            await self._attempts(cand, offering)
        except _Done:
            if reservation:
                self.b.ledger.settle(reservation, self.result[4].usd if self.result else None)
            return True
        except ProviderError:
            pass
        except asyncio.CancelledError:
            if reservation:
                self.b.ledger.release(reservation)
            raise
        if reservation:
            self.b.ledger.release(reservation)
        return False

    async def _attempts(self, cand: Candidate, offering: Offering) -> None:
        """The first attempt runs bare, since most calls end there; after a retryable failure
        tenacity drives the rest, waiting before each (Retry-After first, else backoff with jitter)."""
        try:
            await self._one(cand, offering)
        except ProviderError as exc:
            if not exc.retryable or self._stop(exc, 1):
                raise
            await asyncio.sleep(self._delay(exc, 1))

        def exception(state: RetryCallState) -> BaseException | None:
            return state.outcome.exception() if state.outcome else None

        retrying = AsyncRetrying(  # its attempt 1 is the call's attempt 2
            stop=lambda state: self._stop(exception(state), state.attempt_number + 1),
            wait=lambda state: self._delay(exception(state), state.attempt_number + 1),
            retry=retry_if_exception(lambda e: getattr(e, "retryable", False)), reraise=True)
        async for attempt in retrying:
            with attempt:
                await self._one(cand, offering)

    def _stop(self, exc: BaseException | None, attempt: int) -> bool:
        r = self.b.policy.retry
        too_long = isinstance(exc, RateLimited) and (exc.retry_after or 0) > r.max_retry_after_s
        return attempt >= r.max_attempts or too_long

    def _delay(self, exc: BaseException | None, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt`: the provider's Retry-After, else
        exponential backoff with full jitter (as tenacity's `wait_random_exponential`)."""
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return exc.retry_after
        r = self.b.policy.retry
        return random.uniform(0, min(r.max_delay_s, r.initial_delay_s * 2 ** (attempt - 1)))

    async def _one(self, cand: Candidate, offering: Offering) -> None:
        provider = self.b.provider(offering.provider)
        settings = self.b.policy.provider(offering.provider)
        timeout = settings.timeout_s or self.b.policy.timeout_s
        ctx = CallContext(timeout_s=timeout, api_key=provider.api_key(), progress=self.progress,
                          attempt=len(self.attempts) + 1)
        started, t0 = datetime.now(UTC), time.perf_counter()
        try:
            try:
                async with asyncio.timeout(timeout):  # unlike wait_for, no extra task per attempt
                    result = await provider.generate(self.request, offering, ctx)
            except TimeoutError:
                raise ProviderUnavailable(f"timed out after {timeout:g} s", provider=offering.provider,
                                          offering=offering.id) from None
            if sum(len(i.data) for i in result.images) > OFFLOAD_BYTES:  # decoding takes milliseconds:
                images = await asyncio.to_thread(validate_images, result, self.request, offering, True)
            else:  # keep the event loop free for the other calls
                images = validate_images(result, self.request, offering)
        except ProviderError as exc:
            self.b.breaker.failure(offering.provider) if exc.retryable else None
            self._attempt(offering, started, t0, error=exc)
            raise
        except asyncio.CancelledError:
            self._attempt(offering, started, t0, error=asyncio.CancelledError("cancelled by the caller"))
            raise
        except Exception as exc:
            self._attempt(offering, started, t0, error=exc)
            raise ProviderError(f"{type(exc).__name__}: {exc}", provider=offering.provider,
                                offering=offering.id) from exc
        cost = settle(result.usage, offering, self.request)
        self.b.breaker.success(offering.provider)
        self._attempt(offering, started, t0, cost=cost, request_id=result.request_id)
        self.result = (offering, cand, result, images, cost)
        raise _Done

    # -- bookkeeping ---------------------------------------------------------------------------
    def _attempt(self, offering: Offering, started: datetime, t0: float, *,
                 error: BaseException | None = None, cost: Cost | None = None,
                 request_id: str | None = None) -> None:
        self.attempts.append(Attempt(
            number=len(self.attempts) + 1, offering=offering.id, started_at=started,
            latency_s=round(time.perf_counter() - t0, 6), status="error" if error else "ok",
            error_type=type(error).__name__ if error else None,
            error=redact(str(error), self.b.secrets()) if error else None,
            http_status=getattr(error, "status", None),
            provider_request_id=getattr(error, "request_id", None) or request_id, cost=cost))

    def _note(self, offering: Offering, error_type: str, message: str, latency: float) -> None:
        self.attempts.append(Attempt(
            number=len(self.attempts) + 1, offering=offering.id, started_at=datetime.now(UTC),
            latency_s=latency, status="error", error_type=error_type, error=message))

    async def _finish_ok(self) -> ImageResult:
        assert self.result is not None
        offering, cand, result, images, cost = self.result
        latency = round(time.perf_counter() - self.t0, 6)
        done = ImageResult(request_id=self.request_id, images=images, offering=offering.id, cost=cost,
                           latency_s=latency, plan=self.plan, attempts=tuple(self.attempts),
                           applied=dict(result.applied, offering=offering.id), dropped=cand.dropped)
        await self.record("ok", result=done)
        return done

    def _call_row(self, status: str, error: BaseException | None) -> dict[str, Any]:
        req, res = self.request, self.result
        offering, cand, _, images, cost = res if res else (None, None, None, (), None)
        first = self.plan.candidates[0] if self.plan.candidates else None
        estimated = (cand or first).estimated_cost.usd if (cand or first) else None
        return {
            "request_id": self.request_id, "created_at": self.started,
            "day": datetime.fromtimestamp(self.started, UTC).strftime("%Y-%m-%d"),
            "status": status, "offering": offering.id if offering else None,
            "provider": offering.provider if offering else None, "n": req.n,
            "images": len(images), "width": images[0].width if images else req.width,
            "height": images[0].height if images else req.height, "seed": req.seed,
            "policy": self.plan.policy, "rule": self.plan.rule, "attempts": len(self.attempts),
            "latency_s": round(time.perf_counter() - self.t0, 6),
            "estimated_nusd": to_nusd(estimated),
            "cost_nusd": to_nusd(cost.usd) if cost else None,
            "cost_status": cost.status if cost else None, "cost_unit": cost.unit if cost else None,
            "usage_json": json.dumps(cost.units, default=str) if cost else None,
            "catalog_version": self.b.catalog.version, "prompt_sha256": req.prompt_sha256(),
            "prompt": req.prompt if self.b.policy.ledger.store_prompts else None,
            "image_sha256s": json.dumps([i.sha256 for i in images]),
            "tags_json": json.dumps(req.tags, sort_keys=True) if req.tags else None,
            "error_type": type(error).__name__ if error else None,
            "error": redact(str(error), self.b.secrets()) if error else None,
            "idempotency_key": req.idempotency_key,
        }

    async def record(self, status: str, error: BaseException | None = None,
                     result: ImageResult | None = None) -> None:
        """The call's row, its attempts and tags: committed before `generate()` returns or raises.
        If the ledger fails, a successful call raises LedgerError carrying its result (the images
        are paid for); a failed one keeps its own error, with a note saying it went unrecorded."""
        self.recorded = True  # from here the rows are written even if this call is cancelled
        try:
            if self.b.in_flight > 1:  # other calls are finishing too: commit together with them
                await self.b.ledger.arecord_call(*self._rows(status, error), pending=self.pending_row)
            else:  # alone: write now rather than wait a loop iteration for company
                self.b.ledger.record_call(*self._rows(status, error), pending=self.pending_row)
        except Exception as exc:
            failure = LedgerError(f"the ledger could not record call {self.request_id} ({status}): "
                                  f"{type(exc).__name__}: {redact(str(exc), self.b.secrets())}", result)
            if error is None:
                raise failure from exc
            error.add_note(str(failure))

    def _rows(self, status: str, error: BaseException | None
              ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
        attempts = [{
            "request_id": self.request_id, "number": a.number, "offering": a.offering,
            "provider": a.offering.split("/", 1)[0], "started_at": a.started_at.timestamp(),
            "latency_s": a.latency_s, "status": a.status, "error_type": a.error_type, "error": a.error,
            "http_status": a.http_status, "provider_request_id": a.provider_request_id,
            "cost_nusd": to_nusd(a.cost.usd) if a.cost else None,
            "cost_status": a.cost.status if a.cost else None, "usage_json": None,
        } for a in self.attempts]
        return self._call_row(status, error), attempts, self.request.tags

