"""The costs report: per group the calls, images, failures, cost, average cost per image, unpriced
count and p50/p95 latency, plus a total.

Whole UTC days come from the ledger's per-day rollups (a few rows per day, whatever the traffic); the
partial days at the edges of a `--since`/`--until` range, and `tag:KEY` groupings, are summed from
the call rows in SQL. Latency percentiles are read from histograms with buckets 1% wide, so they are
within 0.5% of the exact value. Costs are exact sums of integer nano-USD.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.engine import Connection

from ..errors import RequestError
from .ledger.schema import (
    ROLLUP_MEASURES,
    bucket_latency_s,
    call_rollups,
    call_sums,
    call_tags,
    calls,
    from_nusd,
    latency_bucket_sql,
    latency_rollups,
)
from .ledger.store import Ledger

DAY_S = 86_400
GROUPINGS = ("provider", "offering", "day", "rule", "policy", "status")


@dataclass
class Group:
    key: str
    calls: int = 0
    images: int = 0
    failures: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced: int = 0
    adapter_errors: int = 0   # attempts that failed on a bug in the adapter, not on the provider
    over_bound: int = 0       # calls that settled above the most they could cost (their reservation)
    cache_hits: int = 0       # calls answered from the cache ($0)
    saved_usd: Decimal = Decimal(0)   # what the calls they repeat cost
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None

    @property
    def avg_cost_per_image_usd(self) -> Decimal | None:
        return (self.cost_usd / self.images).quantize(Decimal("1e-9")) if self.images else None

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "calls": self.calls, "images": self.images, "failures": self.failures,
                "cost_usd": self.cost_usd, "avg_cost_per_image_usd": self.avg_cost_per_image_usd,
                "unpriced": self.unpriced, "adapter_errors": self.adapter_errors, "over_bound": self.over_bound,
                "cache_hits": self.cache_hits, "saved_usd": self.saved_usd,
                "latency_p50_s": self.latency_p50_s,
                "latency_p95_s": self.latency_p95_s}


def parse_when(text: str | None) -> float | None:
    """`7d`, `12h`, `30m`, a date (YYYY-MM-DD: its midnight, UTC) or an ISO time, as unix seconds."""
    if not text:
        return None
    m = re.fullmatch(r"(\d+)([dhm])", text.strip())
    try:
        if m:
            unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
            return (datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})).timestamp()
        when = datetime.fromisoformat(text)
    except ValueError:
        raise RequestError(f"{text!r} is not a duration (7d, 12h, 30m) or a date (2026-11-22)") from None
    except OverflowError:
        raise RequestError(f"{text!r} reaches back before the year 1") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _percentiles(hist: dict[int, int]) -> tuple[float, float]:
    """p50 and p95 (nearest rank) from a {bucket: count} latency histogram."""
    total, ordered = sum(hist.values()), sorted(hist.items())

    def at(q: float) -> float:
        rank, seen = max(1, round(q * total)), 0
        for bucket, count in ordered:
            seen += count
            if seen >= rank:
                return round(bucket_latency_s(bucket), 3)
        raise AssertionError("unreachable: rank <= total")

    return at(0.5), at(0.95)


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def split_range(since: float | None, until: float | None
                ) -> tuple[tuple[str | None, str | None] | None, list[tuple[float | None, float | None]]]:
    """[since, until) as the whole UTC days in it, [first, last) (None: unbounded; None for the pair:
    no whole day), and the partial days at its edges as time ranges."""
    first = None if since is None else math.ceil(since / DAY_S) * DAY_S    # first midnight >= since
    last = None if until is None else math.floor(until / DAY_S) * DAY_S    # last midnight <= until
    if first is not None and last is not None and first >= last:
        return None, [(since, until)] if since < until else []  # type: ignore[operator]
    edges: list[tuple[float | None, float | None]] = []
    if since is not None and since < first:  # type: ignore[operator]
        edges.append((since, first))
    if until is not None and last < until:  # type: ignore[operator]
        edges.append((last, until))
    return (None if first is None else _day(first), None if last is None else _day(last)), edges


Sums = tuple[Any, int, int, int, int, int, int, int, int, int]  # key, then ROLLUP_MEASURES


def _from_rollups(conn: Connection, by: str, days: tuple[str | None, str | None]
                  ) -> tuple[Iterable[Sums], Iterable[tuple[Any, int, int]]]:
    def within(table: Any) -> list[Any]:
        return [c for c in (None if days[0] is None else table.c.day >= days[0],
                            None if days[1] is None else table.c.day < days[1]) if c is not None]

    r, lr = call_rollups, latency_rollups
    key = r.c[by]
    sums = select(key, *(func.sum(r.c[m]) for m in ROLLUP_MEASURES)).where(*within(r)).group_by(key)
    if by == "status":  # latencies are only kept for calls that succeeded
        hist = select(lr.c.bucket, func.sum(lr.c.calls)).where(*within(lr)).group_by(lr.c.bucket)
        return conn.execute(sums), [("ok", b, n) for b, n in conn.execute(hist)]
    hist = select(lr.c[by], lr.c.bucket, func.sum(lr.c.calls)).where(*within(lr)).group_by(lr.c[by], lr.c.bucket)
    return conn.execute(sums), conn.execute(hist)


def _from_rows(conn: Connection, by: str, tag: str | None, since: float | None, until: float | None
               ) -> tuple[Iterable[Sums], Iterable[tuple[Any, int, int]]]:
    key = (func.coalesce(call_tags.c.value, "(untagged)") if tag else func.coalesce(calls.c[by], ""))
    source = (calls.outerjoin(call_tags, and_(call_tags.c.request_id == calls.c.request_id,
                                              call_tags.c.key == tag)) if tag else calls)
    where = [calls.c.status != "pending"]
    if since is not None:
        where.append(calls.c.created_at >= since)
    if until is not None:
        where.append(calls.c.created_at < until)
    sums = select(key, *call_sums()).select_from(source).where(*where).group_by(key)
    bucket = latency_bucket_sql()
    hist = (select(key, bucket, func.count()).select_from(source)
            .where(*where, calls.c.status == "ok", calls.c.cached == 0, calls.c.latency_s.is_not(None))
            .group_by(key, bucket))
    return conn.execute(sums), conn.execute(hist)


def cost_report(ledger: Ledger, *, since: float | None = None, until: float | None = None,
                by: str = "provider") -> tuple[list[Group], Group]:
    tag = by.removeprefix("tag:") if by.startswith("tag:") else None
    if tag == "":
        raise RequestError("--by tag: needs the tag's key, e.g. tag:team")
    if tag is None and by not in GROUPINGS:
        raise RequestError(f"--by {by!r}: use one of {', '.join(GROUPINGS)} or tag:KEY")
    groups: dict[str, Group] = {}
    hists: dict[str, dict[int, int]] = {}
    with ledger.engine.connect() as conn:
        if tag is not None:
            parts = [_from_rows(conn, by, tag, since, until)]
        else:
            days, edges = split_range(since, until)
            parts = [_from_rows(conn, by, None, a, b) for a, b in edges]
            if days is not None:
                parts.append(_from_rollups(conn, by, days))
        for sums, hist in parts:
            for k, n, images, failures, cost, unp, adapter, over, hits, saved in sums:
                g = groups.setdefault(str(k) or "(none)", Group(str(k) or "(none)"))
                g.calls += int(n)
                g.images += int(images or 0)
                g.failures += int(failures or 0)
                g.cost_usd += from_nusd(int(cost or 0)) or Decimal(0)
                g.unpriced += int(unp or 0)
                g.adapter_errors += int(adapter or 0)
                g.over_bound += int(over or 0)
                g.cache_hits += int(hits or 0)
                g.saved_usd += from_nusd(int(saved or 0)) or Decimal(0)
            for k, bucket, count in hist:
                h = hists.setdefault(str(k) or "(none)", {})
                h[int(bucket)] = h.get(int(bucket), 0) + int(count)
    total = Group("total")
    every: dict[int, int] = {}
    for g in groups.values():
        for field in ("calls", "images", "failures", "cost_usd", "unpriced", "adapter_errors", "over_bound",
                      "cache_hits", "saved_usd"):
            setattr(total, field, getattr(total, field) + getattr(g, field))
        h = hists.get(g.key)
        if h:
            for b, c in h.items():
                every[b] = every.get(b, 0) + c
            g.latency_p50_s, g.latency_p95_s = _percentiles(h)
    if every:
        total.latency_p50_s, total.latency_p95_s = _percentiles(every)
    ordered = sorted(groups.values(), key=lambda g: (-g.cost_usd, g.key))
    return ordered, total
