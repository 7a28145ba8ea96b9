"""What one call leaves in the ledger: its attempts and skips as they happen, then its rows.

`CallLog` is the call loop's notebook (`execution.py` decides, this writes down). `generate()` returns
only after `record` has committed; if the ledger fails, a successful call raises `LedgerError` carrying
its result (the images were paid for), and a failed one keeps its own error with a note saying it went
unrecorded.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ..errors import AdapterError, BudgetExceeded, LedgerError, redact
from ..logs import logger
from ..policies.schema import Policy
from ..providers.base import AttemptCallback
from ..providers.offering import Offering
from ..types import Attempt, Cost, GeneratedImage, ImageRequest, ImageResult, Plan, Skip, SkipReason
from .cache import adapter_digest
from .ledger.schema import to_nusd
from .ledger.store import Ledger

PLANNED = ("width", "height", "aspect_ratio", "resolution", "n", "steps", "guidance_scale", "scheduler", "quality",
           "output_format", "background", "model", "max_cost_usd", "max_latency_s")


def planning_fields(request: ImageRequest) -> str:
    """The request as the planner reads it, for a what-if replay: every field it plans by, the prompt's
    length (per-token prices) and whether there was a negative prompt and a seed, never their text."""
    fields: dict[str, Any] = {f: getattr(request, f) for f in PLANNED if getattr(request, f) is not None}
    fields.update(prompt_chars=len(request.prompt), negative_prompt=bool(request.negative_prompt),
                  seeded=request.seed is not None,
                  adapters=[{"ref": a.ref, "scale": a.scale, "sha256": _adapter_sha256(a.ref)}
                            for a in request.adapters])
    if request.control:   # the kinds the planner reads, and what each control was; never the image's bytes
        fields["control"] = [c.describe() for c in request.control]
    if request.image_prompts:
        fields["image_prompts"] = [p.describe() for p in request.image_prompts]
    if request.is_edit:   # sizes for the planner, hashes to know the inputs again; never their bytes
        fields["edit"] = {"images": [i.describe() for i in request.images], "strength": request.strength,
                          "mask": request.mask.describe() if request.mask else None}
    return json.dumps(fields, default=str, sort_keys=True)


def _adapter_sha256(ref: str) -> str | None:
    """A LoRA file's contents by hash (memoised per size and time), a folder's or Hub id's fingerprint."""
    try:
        return adapter_digest(ref)
    except OSError:
        return None


@dataclass(frozen=True)
class Served:
    """What the successful attempt gave the call, for its row."""

    offering: Offering
    images: tuple[GeneratedImage, ...]
    cost: Cost
    estimated: Cost
    bound_usd: Decimal | None

    @property
    def over_bound(self) -> bool:
        """Settled above the most it could cost (what a budget reserved): flagged, never hidden."""
        return None not in (self.cost.usd, self.bound_usd) and self.cost.usd > self.bound_usd  # type: ignore[operator]


@dataclass
class CallLog:
    request: ImageRequest
    plan: Plan
    request_id: str
    ledger: Ledger
    policy: Policy
    catalog_version: str
    secrets: Callable[[], list[str | None]]
    on_attempt: AttemptCallback | None = None   # the caller's, told of each try before it starts
    attempts: list[Attempt] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    refusals: list[BudgetExceeded] = field(default_factory=list)   # by `restrict` budgets
    ledger_faults: list[LedgerError] = field(default_factory=list)  # budget steps that failed after paying
    # attempts without a result that cost something: an unknown outcome (its estimate), a failed or cancelled
    # canvas run (the seconds it used), an answer whose images were refused (what it billed)
    maybe_billed: list[Cost] = field(default_factory=list)
    rate_waits: list[float] = field(default_factory=list)   # seconds until a rate-limited provider frees
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    cache_key: str | None = None    # what a later identical request finds this call by (deterministic)
    store_url: str | None = None    # where its images were stored
    saved_nusd: int | None = None   # answered from the cache: what the call it repeats cost
    pending_row: bool = False   # a pending row exists (the call holds a budget reservation)
    recorded: bool = False

    def redact(self, text: str) -> str:
        return redact(text, self.secrets())

    def ledger_error(self, what: str, exc: BaseException, result: ImageResult | None = None,
                     status: str | None = None) -> LedgerError:
        """`exc` as a one-line LedgerError naming the call (and its `status`, when recording it)."""
        if isinstance(exc, LedgerError) and status is None:
            return exc
        call = f"call {self.request_id}" + (f" ({status})" if status else "")
        return LedgerError(f"the ledger could not {what} {call}: {type(exc).__name__}: "
                           f"{_first_line(self.redact(str(exc)))}", result)

    # -- as it happens -------------------------------------------------------------------------
    def attempt(self, offering: Offering, started: datetime, t0: float, *, error: BaseException | None = None,
                cost: Cost | None = None, request_id: str | None = None) -> None:
        a = Attempt(
            number=len(self.attempts) + 1, offering=offering.id, started_at=started,
            latency_s=round(time.perf_counter() - t0, 6), status="error" if error else "ok",
            error_type=type(error).__name__ if error else None,
            error=self.redact(str(error)) if error else None,
            http_status=getattr(error, "status", None),
            provider_request_id=self._provider_id(getattr(error, "request_id", None) or request_id), cost=cost)
        self.attempts.append(a)
        logger.debug("call %s attempt %d on %s: %s in %.3f s%s", self.request_id, a.number, a.offering,
                     a.error_type or "ok", a.latency_s, f" ({a.error})" if a.error else "")

    def announce(self, offering: Offering) -> None:
        """Tell the caller's `on_attempt` of the try about to start; its failure is not the call's."""
        if self.on_attempt is None:
            return
        try:
            self.on_attempt(offering.id, len(self.attempts) + 1)
        except Exception:
            logger.warning("the on_attempt callback raised; the call goes on", exc_info=True)

    def _provider_id(self, value: str | None) -> str | None:
        return None if value is None else self.redact(str(value))[:200]

    def skip(self, offering: Offering, reason: SkipReason, detail: str) -> Skip:
        s = Skip(offering=offering.id, reason=reason, detail=detail, at=datetime.now(UTC))
        self.skips.append(s)
        logger.info("call %s skips %s: %s (%s)", self.request_id, offering.id, reason, detail)
        return s

    async def start_pending(self, estimated: Cost) -> None:
        """A pending row before the first reserved try, so that a crash mid-call stays visible."""
        if not self.pending_row:
            await self.ledger.off_loop(self.ledger.start_call, self._call_row("pending", None, None, estimated))
            self.pending_row = True

    def call_cost(self, served: Served | None) -> Cost | None:
        """What the call cost: what served it, plus what its unknown outcomes may have cost."""
        return _with_maybe_billed(served.cost if served else None, self.maybe_billed)

    def latency_s(self) -> float:
        return round(time.perf_counter() - self.t0, 6)

    # -- the rows ------------------------------------------------------------------------------
    def _call_row(self, status: str, error: BaseException | None, served: Served | None,
                  estimated: Cost | None) -> dict[str, Any]:
        req = self.request
        images = served.images if served else ()
        cost = self.call_cost(served)
        if estimated is None and self.plan.candidates:
            estimated = self.plan.candidates[0].estimated_cost
        # what served it; for a call that failed, what it tried last (its failure is counted there)
        offering = served.offering.id if served else self.attempts[-1].offering if self.attempts else None
        return {
            "request_id": self.request_id, "created_at": self.started,
            "day": datetime.fromtimestamp(self.started, UTC).strftime("%Y-%m-%d"),
            "status": status, "offering": offering, "provider": offering.split("/", 1)[0] if offering else None,
            "n": req.n,
            "images": len(images), "width": images[0].width if images else req.width,
            "height": images[0].height if images else req.height, "seed": req.seed,
            "policy": self.plan.policy, "rule": self.plan.rule, "attempts": len(self.attempts),
            "latency_s": self.latency_s(),
            "estimated_nusd": to_nusd(estimated.usd) if estimated else None,
            "cost_nusd": to_nusd(cost.usd) if cost else None,
            "cost_status": cost.status if cost else None, "cost_unit": cost.unit if cost else None,
            "usage_json": json.dumps(cost.units, default=str) if cost else None,
            "catalog_version": self.catalog_version, "prompt_sha256": req.prompt_sha256(),
            "prompt": req.prompt if self.policy.ledger.store_prompts else None,
            "image_sha256s": json.dumps([i.sha256 for i in images]),
            "tags_json": json.dumps(req.tags, sort_keys=True) if req.tags else None,
            "error_type": type(error).__name__ if error else None,
            "error": self.redact(str(error)) if error else None,
            "idempotency_key": req.idempotency_key,
            "adapter_errors": sum(a.error_type == AdapterError.__name__ for a in self.attempts),
            "over_bound": int(served is not None and served.over_bound),
            "cached": int(self.saved_nusd is not None), "saved_nusd": self.saved_nusd,
            "cache_key": self.cache_key if status == "ok" else None, "store_url": self.store_url,
            "c2pa": sum(i.c2pa for i in images),
            "request_json": planning_fields(req),
        }

    def rows(self, status: str, error: BaseException | None, served: Served | None = None
             ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
        attempts = [{
            "request_id": self.request_id, "number": a.number, "offering": a.offering,
            "provider": a.offering.split("/", 1)[0], "started_at": a.started_at.timestamp(),
            "latency_s": a.latency_s, "status": a.status, "error_type": a.error_type, "error": a.error,
            "http_status": a.http_status, "provider_request_id": a.provider_request_id,
            "cost_nusd": to_nusd(a.cost.usd) if a.cost else None,
            "cost_status": a.cost.status if a.cost else None, "usage_json": None,
        } for a in self.attempts]
        skips = [{"request_id": self.request_id, "number": i, "offering": s.offering,
                  "provider": s.offering.split("/", 1)[0], "reason": str(s.reason), "detail": s.detail,
                  "at": s.at.timestamp()} for i, s in enumerate(self.skips, 1)]
        call = self._call_row(status, error, served, served.estimated if served else None)
        return call, attempts, skips, self.request.tags

    async def record(self, status: str, *, error: BaseException | None = None, served: Served | None = None,
                     result: ImageResult | None = None, together: bool = False) -> None:
        """The call's rows, committed before this returns; `together`: share a transaction with the
        other calls finishing in this loop iteration (group commit)."""
        self.recorded = True  # from here the rows are written even if this call is cancelled
        try:
            rows = self.rows(status, error, served)
            if together:
                await self.ledger.arecord_call(*rows, pending=self.pending_row)
            else:  # alone: write now rather than wait a loop iteration for company
                await self.ledger.off_loop(self.ledger.record_call, *rows, pending=self.pending_row)
        except Exception as exc:
            failure = self.ledger_error("record", exc, result, status)
            logger.error("%s", failure)
            if error is None:
                raise failure from exc
            error.add_note(str(failure))
            return
        logger.debug("call %s recorded: %s, %d attempt(s), %d skip(s)", self.request_id, status,
                     len(self.attempts), len(self.skips))

    def record_cancelled(self) -> None:
        """The caller gave up (a timeout of theirs, a shutdown): the call and its attempt in flight
        are written as `cancelled`, and the cancellation is what the caller sees."""
        if not self.recorded:
            self.recorded = True
            with contextlib.suppress(Exception):
                self.ledger.record_call(*self.rows("cancelled", None), pending=self.pending_row)


def _first_line(text: str, limit: int = 300) -> str:
    """A driver's error in one line (SQLAlchemy appends the whole statement and its parameters)."""
    return (text.strip().splitlines() or [""])[0][:limit]


def _with_maybe_billed(cost: Cost | None, maybe: list[Cost]) -> Cost | None:
    """The call's cost: what served it plus what its attempts without a result cost or may have (never
    dropped); `estimated` when any of those is an estimate."""
    if not maybe:
        return cost
    extra = [c.usd for c in maybe]
    if None in extra or (cost is not None and cost.usd is None):
        return cost or maybe[0]
    total = sum(extra, (cost.usd if cost else 0) or Decimal(0))  # type: ignore[arg-type]
    guessed = sum(c.status == "estimated" for c in maybe)
    what = f"{len(maybe)} attempt(s) without a result" + (f", {guessed} estimated" if guessed else "")
    if cost is None:
        return maybe[0].model_copy(update={"usd": total, "detail": what,
                                           "status": "estimated" if guessed else maybe[0].status})
    return cost.model_copy(update={"usd": total, "detail": f"{cost.detail} + {what}",
                                   "status": "estimated" if guessed else cost.status})
