"""The costs report reads whole days from the rollups kept on write and the edges of a range from the
rows; either way it must say exactly what a sum over the rows says."""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from decimal import Decimal

import pytest
from sqlalchemy import create_engine, insert, select

from imagebroker.broker.ledger.schema import MIGRATIONS, calls, migrations_table
from imagebroker.broker.ledger.store import Ledger
from imagebroker.broker.ledger.writer import CALL_COLUMNS
from imagebroker.broker.report import GROUPINGS, cost_report, split_range

DAY = 86_400
T0 = 1_795_000_000.0  # 2026-11-18 ~08:53 UTC


def random_rows(rng: random.Random, count: int) -> list[dict]:
    out = []
    for i in range(count):
        created = T0 + rng.uniform(-3 * DAY, 3 * DAY)
        status = rng.choice(["ok", "ok", "ok", "ok", "error", "rejected"])
        offering = None if status == "rejected" else rng.choice(["a/x", "a/y", "b/z"])
        cost = rng.choice([None, rng.randrange(1, 90_000_000)]) if status == "ok" else None
        row = {c: None for c in CALL_COLUMNS}
        row.update(request_id=f"r{i:06d}", created_at=created, status=status, n=2,
                   day=time.strftime("%Y-%m-%d", time.gmtime(created)), offering=offering,
                   provider=offering.split("/")[0] if offering else None, images=2 if status == "ok" else 0,
                   policy=rng.choice(["p", "q"]), rule=rng.choice([None, "big"]), attempts=1,
                   latency_s=rng.choice([0.0004, rng.uniform(0.01, 40)]), cost_nusd=cost,
                   prompt_sha256="0" * 64, adapter_errors=rng.choice([0, 0, 0, 1]),
                   over_bound=int(status == "ok" and rng.random() < 0.2), c2pa=0,
                   cached=int(status == "ok" and rng.random() < 0.1))
        row["saved_nusd"] = rng.randrange(1, 90_000_000) if row["cached"] else None
        out.append(row)
    return out


def by_hand(rows: list[dict], by: str, since: float | None, until: float | None) -> dict[str, dict]:
    groups: dict[str, dict] = defaultdict(lambda: defaultdict(int, lat=[]))
    for r in rows:
        if (since is not None and r["created_at"] < since) or (until is not None and r["created_at"] >= until):
            continue
        g = groups[r[by] or "(none)"]
        ok = r["status"] == "ok"
        g["calls"] += 1
        g["images"] += r["images"]
        g["failures"] += not ok
        g["cost"] += r["cost_nusd"] or 0
        g["unpriced"] += ok and r["cost_nusd"] is None
        g["adapter_errors"] += r["adapter_errors"]
        g["over_bound"] += r["over_bound"]
        g["cache_hits"] += r["cached"]
        g["saved"] += r["saved_nusd"] or 0
        if ok and not r["cached"]:   # a cache hit's milliseconds say nothing of the offering's speed
            g["lat"].append(r["latency_s"])
    return groups


def nearest_rank(values: list[float], q: float) -> float:
    return sorted(values)[max(1, round(q * len(values))) - 1]


def assert_matches(report: tuple, expected: dict[str, dict]) -> None:
    groups, total = report
    assert {g.key for g in groups} == set(expected)
    for g in groups:
        e = expected[g.key]
        assert (g.calls, g.images, g.failures, g.unpriced, g.adapter_errors, g.over_bound) == (
            e["calls"], e["images"], e["failures"], e["unpriced"], e["adapter_errors"], e["over_bound"])
        assert g.cost_usd == Decimal(e["cost"]) / 10**9  # exact
        assert (g.cache_hits, g.saved_usd) == (e["cache_hits"], Decimal(e["saved"]) / 10**9)
        for got, q in ((g.latency_p50_s, 0.5), (g.latency_p95_s, 0.95)):
            if not e["lat"]:
                assert got is None
                continue
            want = max(nearest_rank(e["lat"], q), 0.001)
            assert got == pytest.approx(want, rel=0.006, abs=0.0006)  # 1% buckets, reported to 1 ms
    assert total.calls == sum(e["calls"] for e in expected.values())
    assert total.cost_usd == Decimal(sum(e["cost"] for e in expected.values())) / 10**9


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ledger, list[dict]]:
    ledger = Ledger(f"sqlite:///{tmp_path_factory.mktemp('r') / 'l.db'}")
    rows = random_rows(random.Random(3), 1500)
    for row in rows:
        ledger.record_call(row, [], [], {})
    return ledger, rows


RANGES = [(None, None), (T0 - 2 * DAY, None), (None, T0 + DAY), (T0 - 1.5 * DAY, T0 + 0.7 * DAY),
          (T0 - 0.2 * DAY, T0 - 0.1 * DAY), (math.floor(T0 / DAY) * DAY, math.ceil(T0 / DAY) * DAY + DAY),
          (T0, T0 - 1)]


@pytest.mark.parametrize("by", GROUPINGS)
@pytest.mark.parametrize("since,until", RANGES)
def test_report_from_rollups_equals_a_sum_over_the_rows(filled, by, since, until):
    ledger, rows = filled
    assert_matches(cost_report(ledger, since=since, until=until, by=by), by_hand(rows, by, since, until))


def test_ranges_split_into_whole_days_and_edges():
    midnight = math.floor(T0 / DAY) * DAY
    assert split_range(None, None) == ((None, None), [])
    assert split_range(midnight, midnight + 2 * DAY) == (("2026-11-18", "2026-11-20"), [])
    assert split_range(T0, T0 + 2 * DAY) == (("2026-11-19", "2026-11-20"),
                                            [(T0, midnight + DAY), (midnight + 2 * DAY, T0 + 2 * DAY)])
    assert split_range(T0, T0 + 60) == (None, [(T0, T0 + 60)])
    assert split_range(T0, T0 - 60) == (None, [])


def test_a_ledger_from_before_the_rollups_is_backfilled_when_opened(tmp_path, ledger_url):
    rows = [dict(r, adapter_errors=0, over_bound=0, cached=0, saved_nusd=None)   # (from m005, m007)
            for r in random_rows(random.Random(5), 400)]
    engine = create_engine(ledger_url)
    with engine.begin() as conn:  # the schema as the last release left it, with calls in it
        migrations_table.create(conn)
        for name, fn in MIGRATIONS[:2]:
            fn(conn)
            conn.execute(insert(migrations_table).values(name=name, applied_at=0))
        old = [c.name for c in calls.columns
               if c.name not in ("idempotency_key", "adapter_errors", "over_bound",   # added by m004, m005
                                 "cached", "saved_nusd", "cache_key", "store_url", "c2pa",   # and m007
                                 "request_json")]   # and m008
        conn.execute(insert(calls), [{c: r[c] for c in old} for r in rows])
    engine.dispose()
    ledger = Ledger(ledger_url)
    with ledger.engine.connect() as conn:
        assert "m003_rollups" in conn.execute(select(migrations_table.c.name)).scalars().all()
    for by in ("provider", "day", "status"):
        assert_matches(cost_report(ledger, by=by), by_hand(rows, by, None, None))
    ledger.record_call(dict(rows[0], request_id="new"), [], [], {})  # and kept from then on
    expected = by_hand([*rows, rows[0]], "offering", None, None)
    assert_matches(cost_report(ledger, by="offering"), expected)
