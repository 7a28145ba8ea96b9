from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select

from imagebroker import AsyncBroker, Broker
from imagebroker.broker.ledger.schema import attempts, budget_counters, calls, reservations
from imagebroker.broker.ledger.store import Ledger
from imagebroker.broker.ledger.writer import CALL_COLUMNS
from imagebroker.broker.report import cost_report
from imagebroker.errors import BudgetExceeded, NoRouteError
from imagebroker.testing.mock import mock_offering
from tests.budget_worker import run_calls
from tests.conftest import mock_policy

EXPECTED_SCHEMA = {
    "calls": {
        "request_id": "VARCHAR(40)", "created_at": "FLOAT", "day": "VARCHAR(10)", "status": "VARCHAR(16)",
        "offering": "VARCHAR(200)", "provider": "VARCHAR(64)", "n": "INTEGER", "images": "INTEGER",
        "width": "INTEGER", "height": "INTEGER", "seed": "BIGINT", "policy": "VARCHAR(200)",
        "rule": "VARCHAR(200)", "attempts": "INTEGER", "latency_s": "FLOAT", "estimated_nusd": "BIGINT",
        "cost_nusd": "BIGINT", "cost_status": "VARCHAR(16)", "cost_unit": "VARCHAR(32)",
        "usage_json": "TEXT", "catalog_version": "VARCHAR(64)", "prompt_sha256": "VARCHAR(64)",
        "prompt": "TEXT", "image_sha256s": "TEXT", "tags_json": "TEXT", "error_type": "VARCHAR(64)",
        "error": "TEXT", "idempotency_key": "VARCHAR(200)", "adapter_errors": "INTEGER",
        "over_bound": "INTEGER", "cached": "INTEGER", "saved_nusd": "BIGINT", "cache_key": "VARCHAR(64)",
        "store_url": "TEXT", "c2pa": "INTEGER", "request_json": "TEXT"},
    "attempts": {
        "id": "INTEGER", "request_id": "VARCHAR(40)", "number": "INTEGER", "offering": "VARCHAR(200)",
        "provider": "VARCHAR(64)", "started_at": "FLOAT", "latency_s": "FLOAT", "status": "VARCHAR(16)",
        "error_type": "VARCHAR(64)", "error": "TEXT", "http_status": "INTEGER",
        "provider_request_id": "VARCHAR(200)", "cost_nusd": "BIGINT", "cost_status": "VARCHAR(16)",
        "usage_json": "TEXT"},
    "call_tags": {"request_id": "VARCHAR(40)", "key": "VARCHAR(64)", "value": "VARCHAR(256)"},
    "budget_counters": {"budget": "VARCHAR(200)", "period": "VARCHAR(16)", "spent_nusd": "BIGINT",
                        "reserved_nusd": "BIGINT"},
    "reservations": {"id": "VARCHAR(40)", "request_id": "VARCHAR(40)", "counters_json": "TEXT",
                     "amount_nusd": "BIGINT", "created_at": "FLOAT", "expires_at": "FLOAT",
                     "host": "VARCHAR(200)", "pid": "INTEGER", "status": "VARCHAR(16)"},
    "imagebroker_migrations": {"name": "VARCHAR(100)", "applied_at": "FLOAT"},
    "call_rollups": {"day": "VARCHAR(10)", "provider": "VARCHAR(64)", "offering": "VARCHAR(200)",
                     "policy": "VARCHAR(200)", "rule": "VARCHAR(200)", "status": "VARCHAR(16)",
                     "calls": "BIGINT", "images": "BIGINT", "failures": "BIGINT", "cost_nusd": "BIGINT",
                     "unpriced": "BIGINT", "adapter_errors": "BIGINT", "over_bound": "BIGINT",
                     "cache_hits": "BIGINT", "saved_nusd": "BIGINT"},
    "skips": {"id": "INTEGER", "request_id": "VARCHAR(40)", "number": "INTEGER", "offering": "VARCHAR(200)",
              "provider": "VARCHAR(64)", "reason": "VARCHAR(32)", "detail": "TEXT", "at": "FLOAT"},
    "latency_rollups": {"day": "VARCHAR(10)", "provider": "VARCHAR(64)", "offering": "VARCHAR(200)",
                        "policy": "VARCHAR(200)", "rule": "VARCHAR(200)", "bucket": "INTEGER",
                        "calls": "BIGINT"},
    "gateway_keys": {"name": "VARCHAR(200)", "key_sha256": "VARCHAR(64)", "prefix": "VARCHAR(16)",
                     "tags_json": "TEXT", "budget_nusd": "BIGINT", "budget_period": "VARCHAR(8)",
                     "admin": "INTEGER", "allow_json": "TEXT", "webhook_url": "TEXT",
                     "webhook_secret": "VARCHAR(64)", "created_at": "FLOAT", "revoked_at": "FLOAT"},
    "gateway_jobs": {"id": "VARCHAR(40)", "key_name": "VARCHAR(200)", "status": "VARCHAR(16)",
                     "request_json": "TEXT", "created_at": "FLOAT", "started_at": "FLOAT", "finished_at": "FLOAT",
                     "worker": "VARCHAR(200)", "http_status": "INTEGER", "response_json": "TEXT"},
}


def test_final_schema_is_pinned_on_both_engines(ledger_url):
    ledger = Ledger(ledger_url)
    insp = inspect(ledger.engine)
    norm = {"DOUBLE PRECISION": "FLOAT", "DOUBLE_PRECISION": "FLOAT"}
    found = {t: {c["name"]: norm.get(str(c["type"]), str(c["type"])) for c in insp.get_columns(t)}
             for t in insp.get_table_names()}
    assert found == EXPECTED_SCHEMA
    assert Ledger(ledger_url).migrate() == []  # migrations run once, by name


def test_money_round_trips_exactly(ledger_url):
    offering = mock_offering("x")
    offering["price"] = {"unit": "per_megapixel", "usd_per_mp": "0.0027", "source": "t",
                         "checked": "2026-11-22", "confidence": "high"}
    policy = mock_policy(offering)
    with Broker(policy, ledger=ledger_url) as b:
        r = b.generate("x", size="1024x768")
    assert r.cost.usd == Decimal("0.002123366")  # 0.786432 MP x $0.0027, to the nano-dollar
    _, total = cost_report(Ledger(ledger_url), by="offering")
    assert total.cost_usd == r.cost.usd  # stored as integer nano-USD: exact, never float


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_budget_holds_under_four_processes(engine, request, tmp_path):
    """200 calls from 4 processes against a budget that admits exactly 37 of them."""
    url = f"sqlite:///{tmp_path / 'l.db'}" if engine == "sqlite" else request.getfixturevalue("pg_url")
    Ledger(url)  # migrate once, before the race
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(run_calls, [(url, "0.37", 50)] * 4)
    ok = sum(r[0] for r in results)
    rejected = sum(r[1] for r in results)
    assert (ok, rejected) == (37, 163)
    ledger = Ledger(url)
    with ledger.engine.connect() as conn:
        spent, reserved = conn.execute(select(budget_counters.c.spent_nusd,
                                              budget_counters.c.reserved_nusd)).one()
        statuses = dict(conn.execute(
            select(calls.c.status, func.count()).group_by(calls.c.status)).all())
    assert spent == 370_000_000 and reserved == 0       # $0.37 spent, nothing left held
    assert statuses == {"ok": 37, "rejected": 163}      # no ledger row lost


def test_kill_9_mid_call_is_reconciled_by_the_next_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    Ledger(url)
    proc = subprocess.Popen([sys.executable, "-m", "tests.budget_worker", url], cwd=Path(__file__).parents[1],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    ledger = Ledger(url)
    deadline = time.time() + 60
    while time.time() < deadline:
        with ledger.engine.connect() as conn:   # mid-call: its reservation held and its pending row written
            held = conn.execute(select(reservations.c.status)).scalars().all()
            pending = conn.execute(select(calls.c.status)).scalars().all()
        if held == ["held"] and pending == ["pending"]:
            break
        time.sleep(0.1)
    assert held == ["held"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    fresh = Ledger(url)  # opening the ledger reconciles
    with fresh.engine.connect() as conn:
        assert conn.execute(select(reservations.c.status)).scalars().all() == ["expired"]
        assert conn.execute(select(budget_counters.c.reserved_nusd)).scalar() == 0
        assert conn.execute(select(calls.c.status)).scalars().all() == ["abandoned"]
    _, total = cost_report(fresh, by="status")
    assert (total.calls, total.failures) == (1, 1)  # the abandoned call counts, as a failure


def test_restrict_budget_routes_to_what_still_fits(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    policy = mock_policy(mock_offering("pricey", price={"usd": "0.05"}, rank=90),
                         mock_offering("cheap", price={"usd": "0.001"}), objective="best",
                         budgets=[{"name": "month", "period": "month", "limit_usd": "0.105",
                                   "on_exceed": "restrict"}])
    with Broker(policy, ledger=url) as b:
        used = [b.generate("x").offering for _ in range(4)]
    assert used == ["mock/pricey", "mock/pricey", "mock/cheap", "mock/cheap"]


def test_restrict_budget_with_no_headroom_is_refused_by_the_planner(tmp_path):
    policy = mock_policy(mock_offering("x", price={"usd": "0.05"}),
                         budgets=[{"name": "day", "period": "day", "limit_usd": "0.05", "on_exceed": "restrict"}])
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        b.generate("x")
        with pytest.raises(NoRouteError, match=r"up to \$0\.0500/call > budget headroom \$0"):
            b.generate("x")


def test_scoped_restrict_budget_with_nothing_left_raises_budget_exceeded(tmp_path):
    budget = {"name": "team", "period": "day", "limit_usd": "0.05", "on_exceed": "restrict",
              "scope": {"tags": {"team": "red"}}}
    policy = mock_policy(mock_offering("x", price={"usd": "0.05"}), budgets=[budget])
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        b.generate("x", tags={"team": "red"})
        assert b.generate("x", tags={"team": "blue"}).images  # another team: not in scope
        with pytest.raises(BudgetExceeded, match="budget 'team' would be exceeded"):
            b.generate("x", tags={"team": "red"})


def test_costs_report_groups_and_totals(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    unpriced = mock_offering("u")
    unpriced["price"] = None
    policy = mock_policy(mock_offering("a", price={"usd": "0.01"}), mock_offering("b", price={"usd": "0.02"}),
                         unpriced, objective="ordered")
    with Broker(policy, ledger=url) as b:
        b.generate("x", n=2, tags={"team": "red"}, model="mock/a")
        b.generate("x", tags={"team": "blue"}, model="mock/b")
        b.generate("x", tags={"team": "red"}, model="mock/u")
    groups, total = cost_report(Ledger(url), by="offering")
    by = {g.key: g for g in groups}
    assert (by["mock/a"].calls, by["mock/a"].images, by["mock/a"].cost_usd) == (1, 2, Decimal("0.02"))
    assert by["mock/a"].avg_cost_per_image_usd == Decimal("0.01")
    assert by["mock/u"].unpriced == 1 and by["mock/u"].cost_usd == 0
    assert (total.calls, total.images, total.cost_usd, total.unpriced) == (3, 4, Decimal("0.04"), 1)
    tags, _ = cost_report(Ledger(url), by="tag:team")
    assert {g.key: g.calls for g in tags} == {"red": 2, "blue": 1}


def test_a_dropped_database_connection_loses_no_row(pg_url):
    """The connection kept for recording calls dies (a PostgreSQL restart, a proxy timeout): the next
    call reconnects and is recorded."""
    import psycopg

    from tests.conftest import PG_URL

    with Broker(mock_policy(mock_offering("x")), ledger=pg_url) as b:
        b.generate("x")
        with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as admin:
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                                   "AND query NOT ILIKE '%pg_stat_activity%'").fetchall()
        assert killed
        b.generate("x")
        with b.ledger.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(calls)).scalar() == 2


@pytest.mark.parametrize("budgeted", [False, True])
def test_a_cancelled_call_is_recorded_with_its_attempt_and_frees_its_reservation(tmp_path, budgeted):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    budgets = [{"name": "b", "period": "day", "limit_usd": "1"}] if budgeted else []
    policy = mock_policy(mock_offering("slow", settings={"script": ["sleep:30"]}), budgets=budgets)

    async def main() -> None:
        async with AsyncBroker(policy, ledger=url) as b:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(b.generate("x"), 0.3)  # the caller's own timeout

    asyncio.run(main())
    ledger = Ledger(url)
    with ledger.engine.connect() as conn:
        assert conn.execute(select(calls.c.status, calls.c.attempts)).all() == [("cancelled", 1)]
        assert conn.execute(select(attempts.c.error_type)).scalars().all() == ["CancelledError"]
        assert conn.execute(select(func.coalesce(func.sum(budget_counters.c.reserved_nusd), 0))).scalar() == 0
    _, total = cost_report(ledger, by="status")
    assert (total.calls, total.failures) == (1, 1)


def test_calls_finishing_together_are_all_recorded(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    policy = mock_policy(mock_offering("x", settings={"script": ["sleep:0.05"]}, price={"usd": "0.01"}))

    async def main() -> None:
        async with AsyncBroker(policy, ledger=url) as b:
            await asyncio.gather(*[b.generate("x", tags={"i": str(i % 3)}) for i in range(300)])

    asyncio.run(main())
    ledger = Ledger(url)
    with ledger.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(calls)).scalar() == 300
        assert conn.execute(select(func.count()).select_from(attempts)).scalar() == 300
    groups, total = cost_report(ledger, by="tag:i")
    assert (total.calls, total.cost_usd) == (300, Decimal("3"))
    assert sorted(g.calls for g in groups) == [100, 100, 100]
    assert cost_report(ledger, by="provider")[1].calls == 300  # the rollups agree with the rows


def test_one_bad_write_in_a_batch_loses_none_of_the_others(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    sql = ledger.writer.sql

    def row(rid: str) -> dict:
        return {c: None for c in CALL_COLUMNS} | {
            "request_id": rid, "created_at": time.time(), "day": "2026-11-22", "status": "ok", "n": 1,
            "images": 1, "attempts": 1, "latency_s": 0.1, "cost_nusd": 5, "prompt_sha256": "0" * 64,
            "adapter_errors": 0, "over_bound": 0, "cached": 0, "c2pa": 0}

    ledger.record_call(row("taken"), [], [], {})

    async def main() -> list:
        return await asyncio.gather(*[ledger.writer.awrite(sql.finished(row(r), [], [], {}, False))
                                      for r in ("a", "taken", "b")], return_exceptions=True)

    outcomes = asyncio.run(main())
    assert outcomes[0] is None and outcomes[2] is None
    assert "UNIQUE" in str(outcomes[1])
    with ledger.engine.connect() as conn:
        assert sorted(conn.execute(select(calls.c.request_id)).scalars()) == ["a", "b", "taken"]
    assert cost_report(ledger)[1].calls == 3  # the failed duplicate added nothing to the rollups


def test_a_forked_child_records_on_connections_of_its_own(ledger_url):
    """Forking servers (gunicorn --preload, multiprocessing's fork) must not share database handles."""
    ledger = Ledger(ledger_url)

    def row(rid: str) -> dict:
        return {c: None for c in CALL_COLUMNS} | {
            "request_id": rid, "created_at": time.time(), "day": "2026-11-22", "status": "ok", "n": 1,
            "images": 1, "attempts": 1, "latency_s": 0.1, "cost_nusd": 5, "prompt_sha256": "0" * 64,
            "adapter_errors": 0, "over_bound": 0, "cached": 0, "c2pa": 0}

    ledger.record_call(row("parent-1"), [], [], {})  # the parent now holds a connection
    pid = os.fork()
    if pid == 0:  # the child
        signal.alarm(30)  # a child stuck on a shared connection dies and fails the test, not hangs it
        try:
            for i in range(50):
                ledger.record_call(row(f"child-{i}"), [], [], {})
        finally:
            os._exit(0)
    for i in range(50):
        ledger.record_call(row(f"parent-{i + 2}"), [], [], {})
    assert os.waitpid(pid, 0)[1] == 0
    with ledger.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(calls)).scalar() == 101
