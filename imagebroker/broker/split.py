"""`n` above an offering's per-call maximum, as several provider calls (the policy's `split_n`, on by default):
one request of at most `max_n` images per call, seeds continuing from the request's, each call tried and
retried like any attempt (one call row holds them all), the images and costs put together at the end."""

from __future__ import annotations

from decimal import Decimal

from ..providers.base import ProviderResult
from ..providers.offering import Offering
from ..types import Candidate, Cost, ImageRequest
from .record import Served


def chunks(request: ImageRequest, max_n: int) -> list[ImageRequest]:
    """The request as parts of at most `max_n` images, image i of the whole keeping seed + i."""
    sizes = [max_n] * (request.n // max_n) + ([request.n % max_n] if request.n % max_n else [])
    parts, offset = [], 0
    for size in sizes:
        seed = None if request.seed is None else request.seed + offset
        parts.append(request.model_copy(update={"n": size, "seed": seed}))
        offset += size
    return parts


def combined(parts: list[tuple[Served, ProviderResult]], cand: Candidate, offering: Offering
             ) -> tuple[Served, ProviderResult]:
    """One outcome from the parts' successes: every image in order, the costs summed (priced only when
    every part's is; unpriced when any is)."""
    costs = [served.cost for served, _ in parts]
    priced = [c.usd for c in costs]
    status = ("unpriced" if None in priced else "priced" if all(c.status == "priced" for c in costs)
              else "estimated")
    usd = None if None in priced else sum((p for p in priced if p is not None), Decimal(0))
    cost = Cost(usd=usd, status=status, unit=costs[0].unit,  # type: ignore[arg-type]
                units={"images": sum(len(s.images) for s, _ in parts), "calls": [c.units for c in costs]},
                detail=f"{len(costs)} calls: " + " + ".join(c.detail for c in costs))
    images = tuple(i for served, _ in parts for i in served.images)
    first = parts[0][1]
    result = ProviderResult([raw for _, r in parts for raw in r.images], {"calls": [r.usage for _, r in parts]},
                            first.request_id, {**first.applied, "split_n": [len(s.images) for s, _ in parts]})
    return Served(offering, images, cost, cand.estimated_cost, cand.bound_usd), result
