"""The costs report: per group the calls, images, failures, cost, average cost per image, unpriced
count and p50/p95 latency, plus a total. Sums are done in SQL, and so is a latency histogram at 1 ms
resolution from which the percentiles are read (exact to the millisecond)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Integer, and_, case, func, select

from ..errors import RequestError
from .ledger.schema import call_tags, calls, from_nusd
from .ledger.store import Ledger

GROUPINGS = ("provider", "offering", "day", "rule", "policy", "status")


@dataclass
class Group:
    key: str
    calls: int = 0
    images: int = 0
    failures: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced: int = 0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None

    @property
    def avg_cost_per_image_usd(self) -> Decimal | None:
        return (self.cost_usd / self.images).quantize(Decimal("1e-9")) if self.images else None

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "calls": self.calls, "images": self.images, "failures": self.failures,
                "cost_usd": self.cost_usd, "avg_cost_per_image_usd": self.avg_cost_per_image_usd,
                "unpriced": self.unpriced, "latency_p50_s": self.latency_p50_s,
                "latency_p95_s": self.latency_p95_s}


def parse_when(text: str | None, *, end: bool = False) -> float | None:
    """`7d`, `12h`, `30m`, a date (YYYY-MM-DD) or an ISO time, as unix seconds (UTC)."""
    if not text:
        return None
    m = re.fullmatch(r"(\d+)([dhm])", text.strip())
    if m:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
        return (datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})).timestamp()
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise RequestError(f"{text!r} is not a duration (7d, 12h, 30m) or a date (2026-11-22)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if end and len(text) == 10:  # a whole day: up to its end
        when += timedelta(days=1)
    return when.timestamp()


def _percentiles(hist: list[tuple[int, int]]) -> tuple[float, float]:
    """p50 and p95 from a (millisecond, count) histogram sorted by millisecond (nearest rank)."""
    total = sum(c for _, c in hist)

    def at(q: float) -> float:
        rank, seen = max(1, round(q * total)), 0
        for ms, count in hist:
            seen += count
            if seen >= rank:
                return ms / 1000
        return hist[-1][0] / 1000

    return at(0.5), at(0.95)


def cost_report(ledger: Ledger, *, since: float | None = None, until: float | None = None,
                by: str = "provider") -> tuple[list[Group], Group]:
    tag = by.removeprefix("tag:") if by.startswith("tag:") else None
    if tag is None and by not in GROUPINGS:
        raise RequestError(f"--by {by!r}: use one of {', '.join(GROUPINGS)} or tag:KEY")
    key = (func.coalesce(call_tags.c.value, "(untagged)") if tag
           else func.coalesce(getattr(calls.c, by), "(none)"))
    source = (calls.outerjoin(call_tags, and_(call_tags.c.request_id == calls.c.request_id,
                                              call_tags.c.key == tag)) if tag else calls)
    where = [calls.c.status != "pending"]
    if since is not None:
        where.append(calls.c.created_at >= since)
    if until is not None:
        where.append(calls.c.created_at < until)
    failed = case((calls.c.status != "ok", 1), else_=0)
    unpriced = case((and_(calls.c.status == "ok", calls.c.cost_nusd.is_(None)), 1), else_=0)
    sums = (select(key.label("k"), func.count(), func.coalesce(func.sum(calls.c.images), 0),
                   func.sum(failed), func.coalesce(func.sum(calls.c.cost_nusd), 0), func.sum(unpriced))
            .select_from(source).where(*where).group_by(key))
    ms = func.cast(calls.c.latency_s * 1000, Integer)
    lat = (select(key.label("k"), ms.label("ms"), func.count()).select_from(source)
           .where(*where, calls.c.status == "ok", calls.c.latency_s.is_not(None)).group_by(key, ms))
    groups: dict[str, Group] = {}
    hists: dict[str, dict[int, int]] = {}
    with ledger.engine.connect() as conn:
        for k, n, images, failures, cost, unp in conn.execute(sums):
            groups[str(k)] = Group(str(k), int(n), int(images), int(failures or 0),
                                   from_nusd(int(cost)) or Decimal(0), int(unp or 0))
        for k, bucket, count in conn.execute(lat):
            h = hists.setdefault(str(k), {})
            h[int(bucket)] = h.get(int(bucket), 0) + int(count)
    total = Group("total")
    every: dict[int, int] = {}
    for g in groups.values():
        for field in ("calls", "images", "failures", "cost_usd", "unpriced"):
            setattr(total, field, getattr(total, field) + getattr(g, field))
        h = hists.get(g.key)
        if h:
            for b, c in h.items():
                every[b] = every.get(b, 0) + c
            g.latency_p50_s, g.latency_p95_s = _percentiles(sorted(h.items()))
    if every:
        total.latency_p50_s, total.latency_p95_s = _percentiles(sorted(every.items()))
    ordered = sorted(groups.values(), key=lambda g: (-g.cost_usd, g.key))
    return ordered, total
