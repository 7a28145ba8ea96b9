"""The call loop: walk the plan; each candidate gives one outcome; the first success is the answer.

    for each planned candidate (fallback never leaves the plan):
        circuit open?                 -> Skip(CIRCUIT_OPEN)
        a budget applies?             -> reserve; no price: Skip(PRICE_UNKNOWN);
                                         refused by a `restrict` budget: Skip(OVER_BUDGET);
                                         by a `reject` budget: Refused (the call stops)
        try it, retrying what is retryable (tenacity's stop and wait rules; Retry-After wins)
                                      -> Success, or Failure with its attempts; each try waits its turn
                                         under the provider's rate limit, and none within the
                                         timeout: Skip(RATE_LIMITED)
        settle or release the reservation
        a refusal (ContentRejected) stops the call unless `fallback.on_refusal: next`

Every outcome is a value; nothing here travels by exception except the caller's own cancellation.
An exception an adapter did not translate into the error tree is a bug: it becomes an `AdapterError`
(logged with its traceback), and the call falls back as for any failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar

from ..errors import (
    AdapterError,
    AllAttemptsFailed,
    BudgetExceeded,
    ContentRejected,
    LedgerError,
    NoRouteError,
    OutcomeUnknown,
    ProviderError,
    ProviderUnavailable,
)
from ..logs import logger
from ..policies.pricing import settle_checked
from ..policies.schema import Budget, ImageChecks, Policy
from ..providers.base import (
    AttemptCallback,
    CallContext,
    ProgressCallback,
    Provider,
    ProviderResult,
    Submission,
    preview_receiver,
    track_submission,
)
from ..providers.catalog import Catalog
from ..providers.offering import Offering, offering_warnings
from ..types import Candidate, Cost, GeneratedImage, ImageRequest, ImageResult, Plan, SkipReason
from .budgets import applicable
from .images import ImageStore
from .ledger.store import Ledger
from .record import CallLog, Served
from .retries import RetryRules
from .shared import SharedState, wait_turn
from .split import chunks, combined
from .stored import from_cache, keep
from .validate import validate_images

T = TypeVar("T")
OFFLOAD_BYTES = 256 * 1024  # images larger than this in all are decoded (and hashed) on a worker thread


@dataclass(frozen=True)
class CallView:
    """What the call loop may use of its broker, and nothing more."""

    policy: Policy
    catalog: Catalog
    ledger: Ledger
    provider: Callable[[str], Provider]
    state: SharedState         # circuit breakers, rate limits: this process's, or shared through Redis
    secrets: Callable[[], list[str | None]]
    busy: Callable[[], bool]   # other calls are under way on this broker (their rows commit together)
    rules: RetryRules          # the policy's retry settings as tenacity's rules (built once)
    store: ImageStore | None = None   # where images are kept, and the cache answers from


# -- outcomes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Success:
    served: Served
    candidate: Candidate
    result: ProviderResult


@dataclass(frozen=True)
class Failure:
    error: ProviderError


@dataclass(frozen=True)
class Skipped:
    reason: SkipReason


@dataclass(frozen=True)
class Refused:
    """A `reject` budget refused the reservation: the call stops here."""

    error: BudgetExceeded


Outcome = Success | Failure | Skipped | Refused


# -- the call -----------------------------------------------------------------------------------
async def execute(view: CallView, request: ImageRequest, plan: Plan, request_id: str,
                  progress: ProgressCallback | None, on_attempt: AttemptCallback | None = None) -> ImageResult:
    log = CallLog(request, plan, request_id, view.ledger, view.policy, view.catalog.version, view.secrets,
                  on_attempt=on_attempt)
    if not plan.candidates:
        error: Exception = NoRouteError(f"no offering can serve this request under policy "
                                        f"{view.policy.name!r}", plan.rejected)
        await log.record("rejected", error=error, together=view.busy())
        raise error
    if (hit := await from_cache(view, log)) is not None:
        return hit
    fallback, rules = view.policy.fallback, view.rules
    stopped: ProviderError | None = None
    try:
        for cand in plan.candidates[: fallback.max_offerings if fallback.enabled else 1]:
            offering = view.catalog.offerings[cand.offering]
            outcome = await _candidate(view, log, rules, cand, offering, progress)
            if isinstance(outcome, Success):
                return await _finish(view, log, outcome)
            if isinstance(outcome, Refused):
                await log.record("rejected", error=outcome.error, together=view.busy())
                raise outcome.error
            if isinstance(outcome, Failure):
                if (isinstance(outcome.error, ContentRejected) and fallback.on_refusal == "stop") or (
                        isinstance(outcome.error, OutcomeUnknown) and view.policy.retry.on_unknown_outcome == "stop"):
                    stopped = outcome.error
                    break
                logger.info("call %s falls back from %s after %s", request_id, offering.id,
                            type(outcome.error).__name__)
    except asyncio.CancelledError:
        log.record_cancelled()
        raise
    if stopped is not None:  # a refusal is an answer, not an outage (an unknown outcome, maybe billed,
        # stops too when the policy says so): no other provider is asked
        stopped.attempts, stopped.skipped = tuple(log.attempts), tuple(log.skips)
        error = stopped
    elif not log.attempts and log.refusals:  # nothing was tried: every candidate was over budget
        error = log.refusals[-1]
    else:
        rate_limited = not log.attempts and all(s.reason == SkipReason.RATE_LIMITED for s in log.skips)
        error = AllAttemptsFailed(log.attempts, log.skips,   # nothing sent: say when a slot is likely
                                  retry_after=min(log.rate_waits) if rate_limited and log.rate_waits else None)
    await log.record("rejected" if isinstance(error, BudgetExceeded) else "error", error=error,
                     together=view.busy())
    for fault in log.ledger_faults:
        error.add_note(str(fault))
    raise error


async def _finish(view: CallView, log: CallLog, outcome: Success) -> ImageResult:
    served, result = outcome.served, outcome.result
    await keep(view, log, served)
    applied = dict(result.applied, offering=served.offering.id)
    for name, items in (("control", log.request.control), ("image_prompts", log.request.image_prompts)):
        if items and name not in applied:   # what every provider was given, whatever its own fields say
            applied[name] = [item.describe() for item in items]
    if dropped := [d.removeprefix("control ") for d in outcome.candidate.dropped if d.startswith("control ")]:
        applied["control"] = [{**c, "dropped": dropped} for c in applied.get("control", [])]   # not sent
    if log.request.aspect_ratio and not log.request.width:   # how the aspect ratio was resolved for it
        res = f" @ {log.request.resolution}" if log.request.resolution else ""
        applied["size_resolved"] = f"{log.request.aspect_ratio}{res} -> {outcome.candidate.size}"
    if len(result.images) > log.request.n:  # billed as the provider reports; the first n are kept
        applied["images_received"] = len(result.images)
        logger.warning("call %s: %s sent %d images for n=%d", log.request_id, served.offering.id,
                       len(result.images), log.request.n)
    done = ImageResult(request_id=log.request_id, images=served.images, offering=served.offering.id,
                       cost=log.call_cost(served), latency_s=log.latency_s(), plan=log.plan,
                       attempts=tuple(log.attempts), applied=applied,
                       dropped=outcome.candidate.dropped, skipped=tuple(log.skips),
                       warnings=offering_warnings(log.request, served.offering) + outcome.candidate.warnings)
    await log.record("ok", served=served, result=done, together=view.busy())
    if log.ledger_faults:  # recorded, but a budget step failed: the caller must know, images in hand
        fault = log.ledger_faults[0]
        raise LedgerError(str(fault), done) from fault.__cause__
    return done


async def _candidate(view: CallView, log: CallLog, rules: RetryRules, cand: Candidate, offering: Offering,
                     progress: ProgressCallback | None) -> Outcome:
    """One planned offering: its budget reservation around its attempts."""
    if not await view.state.allow(offering.provider):
        log.skip(offering, SkipReason.CIRCUIT_OPEN, "provider skipped: circuit open after repeated failures")
        return Skipped(SkipReason.CIRCUIT_OPEN)
    limits = [(b.name, period, b.limit_usd) for b, period in applicable(view.policy.budgets, log.request, offering)]
    reservation = None
    if limits:
        amount = cand.bound_usd  # the most it can cost, so that a dearer settlement cannot overspend
        if amount is None:
            log.skip(offering, SkipReason.PRICE_UNKNOWN, "price unknown, so the budget cannot be checked")
            return Skipped(SkipReason.PRICE_UNKNOWN)
        rid = f"{log.request_id}-{len(log.attempts) + len(log.skips)}"  # the same on a retried reserve
        try:
            reservation = await view.ledger.off_loop(view.ledger.reserve, log.request_id, limits, amount,
                                                     view.policy.ledger.reservation_ttl_s, rid=rid)
            await log.start_pending(cand.estimated_cost)
        except BudgetExceeded as exc:
            if _budget(view.policy, exc.budget).on_exceed == "reject":
                return Refused(exc)
            log.refusals.append(exc)
            log.skip(offering, SkipReason.OVER_BUDGET, str(exc))
            return Skipped(SkipReason.OVER_BUDGET)
        except Exception as exc:  # nothing was paid: the call cannot go on without its budget checked
            if reservation:  # reserved, but its pending row could not be written
                await _ledger_step(view, log, "release the budget of", view.ledger.release, reservation)
            raise log.ledger_error("reserve budget for", exc) from exc
    unknown_before = len(log.maybe_billed)
    try:
        if log.request.n > offering.capabilities.max_n:   # the planner kept it: the policy's split_n is on
            outcome = await _in_parts(view, log, rules, cand, offering, progress)
        else:
            outcome = await _attempts(view, log, rules, cand, offering, progress, log.request)
    except asyncio.CancelledError:   # what a cancelled call may have been billed stays counted
        if reservation:
            await _close(view, log, reservation, log.maybe_billed[unknown_before:], None)
        raise
    if reservation:
        await _close(view, log, reservation, log.maybe_billed[unknown_before:], outcome)
    return outcome


async def _close(view: CallView, log: CallLog, reservation: str, maybe: list[Cost],
                 outcome: Outcome | None) -> None:
    """Settle a reservation at what was paid plus what unknown outcomes may have cost (at their estimate),
    or release it when nothing may have been."""
    spent = [c.usd for c in maybe]
    if isinstance(outcome, Success):
        spent.append(outcome.served.cost.usd)
    if spent:
        total = sum((usd for usd in spent if usd is not None), Decimal(0))
        await _ledger_step(view, log, "settle the budget of", view.ledger.settle, reservation, total)
    else:
        await _ledger_step(view, log, "release the budget of", view.ledger.release, reservation)


async def _ledger_step(view: CallView, log: CallLog, what: str, step: Callable[..., None], *args: object) -> None:
    """A budget step after the provider was called: its failure must not lose the call (its images,
    its error); it is kept on the log and reported once the call's rows are written."""
    try:
        await view.ledger.off_loop(step, *args)
    except Exception as exc:
        log.ledger_faults.append(log.ledger_error(what, exc))


def _budget(policy: Policy, name: str) -> Budget:
    return next(b for b in policy.budgets if b.name == name)


async def _in_parts(view: CallView, log: CallLog, rules: RetryRules, cand: Candidate, offering: Offering,
                    progress: ProgressCallback | None) -> Success | Failure | Skipped:
    """n above the offering's per-call maximum: one part after another (`split.py`). A part that fails
    ends the candidate; the parts already made were paid for: their cost is counted and their images kept
    in the store."""
    done: list[tuple[Served, ProviderResult]] = []
    for part in chunks(log.request, offering.capabilities.max_n):
        outcome = await _attempts(view, log, rules, cand, offering, progress, part)
        if not isinstance(outcome, Success):
            for served, _ in done:
                log.maybe_billed.append(served.cost)
                await keep(view, log, served)
            return outcome
        done.append((outcome.served, outcome.result))
    served, result = combined(done, cand, offering)
    return Success(served, cand, result)


async def _attempts(view: CallView, log: CallLog, rules: RetryRules, cand: Candidate, offering: Offering,
                    progress: ProgressCallback | None, request: ImageRequest) -> Success | Failure | Skipped:
    """Try one offering until it succeeds or the retry rules say stop."""
    number = 1
    while True:
        outcome = await _attempt(view, log, cand, offering, progress, request)
        if not isinstance(outcome, Failure):
            return outcome
        wait = rules.delay(outcome.error, number)
        if wait is None:
            return outcome
        logger.info("call %s retries %s in %.2f s after %s", log.request_id, offering.id, wait,
                    type(outcome.error).__name__)
        await asyncio.sleep(wait)
        number += 1


async def _attempt(view: CallView, log: CallLog, cand: Candidate, offering: Offering,
                   progress: ProgressCallback | None, request: ImageRequest) -> Success | Failure | Skipped:
    """One request to one offering, once its provider's rate limit (if it has one) gives it a turn; the wait
    counts against the attempt's timeout."""
    provider = view.provider(offering.provider)
    timeout = provider.settings.timeout_s or view.policy.timeout_s
    limit = provider.settings.rate_limit
    if limit is None:
        return await _send(view, log, cand, offering, progress, request, provider, timeout)
    turn = await wait_turn(view.state, offering.provider, limit, timeout)
    if turn.token is None:
        log.rate_waits.append(turn.retry_after)
        log.skip(offering, SkipReason.RATE_LIMITED, f"{offering.provider}'s rate limit ({limit}) had no slot "
                 f"within {timeout:g} s; the next is likely in {turn.retry_after:.1f} s")
        return Skipped(SkipReason.RATE_LIMITED)
    if turn.waited_s >= 0.05:
        logger.info("call %s waited %.2f s for %s's rate limit (%s)", log.request_id, turn.waited_s,
                    offering.provider, limit)
    try:
        return await _send(view, log, cand, offering, progress, request, provider, timeout - turn.waited_s)
    finally:
        await view.state.give_back(offering.provider, turn.token)


async def _send(view: CallView, log: CallLog, cand: Candidate, offering: Offering, progress: ProgressCallback | None,
                request: ImageRequest, provider: Provider, timeout: float) -> Success | Failure:
    """The request itself: its images checked, its cost settled, its attempt written down."""
    sub = track_submission()
    ctx = CallContext(timeout_s=timeout, api_key=provider.api_key(), progress=progress,
                      attempt=len(log.attempts) + 1,
                      partial=preview_receiver(progress) if request.partial_images else None)
    log.announce(offering)
    started, t0 = datetime.now(UTC), time.perf_counter()
    where = {"provider": offering.provider, "offering": offering.id}
    result: ProviderResult | None = None
    try:
        async with asyncio.timeout(timeout):  # unlike wait_for, no extra task per attempt
            result = await provider.generate(request, offering, ctx)
        images = await _checked_images(result, request, offering, view.policy.images)
    except ProviderError as exc:
        error: ProviderError = exc
    except TimeoutError:
        kind = OutcomeUnknown if sub.sent else ProviderUnavailable  # sent: it may be running, and billed
        error = kind(f"timed out after {timeout:g} s", request_id=sub.request_id, **where)
    except asyncio.CancelledError:  # the caller gave up (Ctrl-C, a timeout of the whole call)
        paid = (settle_checked(result.usage, offering, request, cand.bound_usd) if result is not None  # billed
                else _failed_cost(sub, cand, offering, request, sub.sent, "cancelled after it was sent"))
        log.attempt(offering, started, t0, error=asyncio.CancelledError("cancelled by the caller"), cost=paid,
                    request_id=sub.request_id)
        if paid is not None:
            log.maybe_billed.append(paid)
        raise
    except Exception as exc:  # the adapter did not translate it: a bug, not an outage
        logger.error("the %s adapter raised %s on %s (a bug: report it); falling back", offering.provider,
                     type(exc).__name__, offering.id, exc_info=True)
        error = AdapterError(f"adapter bug: {type(exc).__name__}: {exc}", **where)
    else:
        cost = settle_checked(result.usage, offering, request, cand.bound_usd)
        if "reported" in cost.units:  # the provider's usage was not believed
            logger.warning("call %s on %s: %s", log.request_id, offering.id, log.redact(cost.detail))
        await view.state.success(offering.provider)
        log.attempt(offering, started, t0, cost=cost, request_id=result.request_id)
        logger.debug("call %s settled on %s: %s", log.request_id, offering.id, cost)
        served = Served(offering, images, cost, cand.estimated_cost, cand.bound_usd)
        if served.over_bound:
            logger.warning("call %s on %s settled at %s, above the bound $%s its budget reserved",
                           log.request_id, offering.id, cost, cand.bound_usd)
        return Success(served, cand, result)
    unknown = isinstance(error, OutcomeUnknown)
    if error.retryable or unknown:
        await view.state.failure(offering.provider)
    if result is not None:   # it answered (and billed); its images were refused
        paid = settle_checked(result.usage, offering, request, cand.bound_usd)
        cost: Cost | None = paid.model_copy(update={"detail": f"answer refused, billed: {paid.detail}"})
    else:
        cost = _failed_cost(sub, cand, offering, request, unknown, "outcome unknown" if unknown else "failed")
    log.attempt(offering, started, t0, error=error, cost=cost)
    if cost is not None:
        log.maybe_billed.append(cost)
    return Failure(error)


def _failed_cost(sub: Submission, cand: Candidate, offering: Offering, request: ImageRequest, maybe: bool,
                 why: str) -> Cost | None:
    """What an attempt without a result cost: what the provider said it used (a canvas server's seconds on
    a failed or cancelled run), else, when it may have been billed, its estimate; None when nothing was."""
    if sub.usage is not None:
        used = settle_checked(sub.usage, offering, request, cand.bound_usd)
        return used.model_copy(update={"detail": f"{why}, used: {used.detail}"})
    if maybe:
        return cand.estimated_cost.model_copy(update={
            "detail": f"{why}, may have been billed: {cand.estimated_cost.detail}"})
    return None


async def _checked_images(result: ProviderResult, request: ImageRequest, offering: Offering,
                          limits: ImageChecks) -> tuple[GeneratedImage, ...]:
    if sum(len(i.data) for i in result.images) > OFFLOAD_BYTES:  # checking takes milliseconds:
        return await asyncio.to_thread(validate_images, result, request, offering, True, limits=limits)
    return validate_images(result, request, offering, limits=limits)  # small ones here: no thread hop

