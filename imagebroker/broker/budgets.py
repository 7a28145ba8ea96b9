"""Which budgets a call falls under, and the counter period it charges (pure)."""

from __future__ import annotations

import fnmatch
from datetime import UTC, datetime

from ..policies.schema import Budget
from ..providers.offering import Offering
from ..types import ImageRequest


def period_key(period: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if period == "day":
        return now.strftime("%Y-%m-%d")
    if period == "week":
        year, week, _ = now.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return now.strftime("%Y-%m")
    return "total"


def in_scope(budget: Budget, request: ImageRequest, offering: Offering) -> bool:
    s = budget.scope
    return (all(request.tags.get(k) == v for k, v in s.tags.items())
            and (s.provider is None or s.provider == offering.provider)
            and (s.offering is None or fnmatch.fnmatchcase(offering.id, s.offering)))


def applicable(budgets: tuple[Budget, ...], request: ImageRequest, offering: Offering,
               now: datetime | None = None) -> list[tuple[Budget, str]]:
    return [(b, period_key(b.period, now)) for b in budgets if in_scope(b, request, offering)]
