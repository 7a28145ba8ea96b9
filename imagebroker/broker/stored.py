"""What a call reads from and writes to the image store: the cache's answer before anything is sent, and the
images it was paid for after (`images.py` is the store itself, `cache.py` its keys)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..logs import logger
from ..providers.offering import offering_warnings
from ..types import ImageResult
from .cache import cache_key, lookup
from .images import ImageStore
from .record import CallLog, Served
from .report import DAY_S

if TYPE_CHECKING:
    from .execution import CallView

T = TypeVar("T")


async def from_cache(view: CallView, log: CallLog) -> ImageResult | None:
    """The answer of the call a seeded request to a deterministic offering repeats, from the store: the
    offering the plan would try first, $0 `cached`, no budget reserved, recorded as a call of its own."""
    if view.store is None:
        return None
    cand = log.plan.candidates[0]
    offering = view.catalog.offerings[cand.offering]
    try:
        log.cache_key = cache_key(log.request, offering, view.policy)
        if log.cache_key is None:
            return None
        since = time.time() - view.policy.cache.ttl_days * DAY_S
        found = await on_store(view.store, lookup, view.ledger, view.store, log.cache_key, since)
    except Exception as exc:  # a cache that cannot be read is a miss, never a failed call
        logger.warning("call %s: the cache could not be read (%s): generating", log.request_id, type(exc).__name__)
        return None
    if found is None:
        return None
    first, images, cost, saved = found
    log.saved_nusd, log.store_url = saved, view.store.shown_url
    logger.info("call %s answered from the cache (call %s)", log.request_id, first)
    served = Served(offering, images, cost, cand.estimated_cost, cand.bound_usd)
    done = ImageResult(request_id=log.request_id, images=images, offering=offering.id, cost=cost,
                       latency_s=log.latency_s(), plan=log.plan, attempts=(),
                       applied={"offering": offering.id, "cached_from": first}, dropped=cand.dropped,
                       warnings=offering_warnings(log.request, offering) + cand.warnings)
    await log.record("ok", served=served, result=done, together=view.busy())
    return done


async def on_store(store: ImageStore, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, on a worker thread when `store` is remote (its I/O would hold up every other call)."""
    return await asyncio.to_thread(fn, *args) if store.remote else fn(*args)


async def keep(view: CallView, log: CallLog, served: Served) -> None:
    """The images into the store (when there is one; a remote one off the event loop); a store that fails
    loses nothing: the caller has the images, and the call is recorded as not stored."""
    store = view.store
    if store is None:
        return
    try:
        for image in served.images:
            await on_store(store, store.put, image.data)
    except Exception as exc:
        logger.warning("call %s: images not stored in %s: %s", log.request_id, store.shown_url,
                       log.redact(str(exc)))
        return
    log.store_url = store.shown_url
    if log.cache_key is None or served.offering.id != log.plan.candidates[0].offering:
        try:
            log.cache_key = cache_key(log.request, served.offering, view.policy)
        except OSError as exc:   # an adapter file gone since: this call is not findable, nothing else
            logger.warning("call %s: no cache key (%s)", log.request_id, exc)
            log.cache_key = None
