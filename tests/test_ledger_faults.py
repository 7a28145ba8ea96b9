"""The ledger never loses a call silently: faults in any ledger step, a PostgreSQL server killing its
backends mid-run, an SQLite file deleted under a running broker, and reservations outliving their TTL."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from imagebroker import AsyncBroker, Broker
from imagebroker.broker.ledger.schema import budget_counters, calls, reservations
from imagebroker.broker.ledger.store import Ledger
from imagebroker.errors import LedgerError
from imagebroker.testing.mock import mock_offering
from tests.conftest import PG_URL, mock_policy


def budgeted(script=("ok",), ttl_s: float = 900.0, limit: str = "1000"):
    return mock_policy(mock_offering("x", settings={"script": list(script)}),
                       budgets=[{"name": "all", "period": "total", "limit_usd": limit}],
                       ledger={"reservation_ttl_s": ttl_s})


def statuses(ledger: Ledger) -> dict[str, int]:
    with ledger.engine.connect() as conn:
        return dict(conn.execute(select(calls.c.status, func.count()).group_by(calls.c.status)).all())


def test_a_deleted_sqlite_file_raises_instead_of_writing_into_nothing(tmp_path):
    db = tmp_path / "l.db"
    with Broker(budgeted(), ledger=f"sqlite:///{db}") as b:
        b.generate("x")
        for suffix in ("", "-wal", "-shm"):
            if (tmp_path / f"l.db{suffix}").exists():
                os.unlink(tmp_path / f"l.db{suffix}")
        with pytest.raises(LedgerError, match="deleted or replaced"):
            b.generate("x")  # refused at the reservation: nothing paid


def test_a_deleted_sqlite_file_after_paying_keeps_the_images(tmp_path):
    db = tmp_path / "l.db"
    with Broker(mock_policy(mock_offering("x")), ledger=f"sqlite:///{db}") as b:  # no budget: pays first
        b.generate("x")
        os.unlink(db)
        with pytest.raises(LedgerError, match="deleted or replaced") as exc:
            b.generate("x", n=2)
    assert len(exc.value.result.images) == 2  # paid for, handed back


def test_a_fault_inside_reserve_is_a_ledger_error_not_a_driver_error(tmp_path):
    db = tmp_path / "l.db"
    with Broker(budgeted(), ledger=f"sqlite:///{db}") as b:
        with b.ledger.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE budget_counters")
        with pytest.raises(LedgerError, match="could not reserve budget for call") as exc:
            b.generate("x")
    assert exc.value.result is None and "\n" not in str(exc.value)


def test_a_fault_inside_settle_after_paying_is_a_ledger_error_with_the_result(ledger_url):
    with Broker(budgeted(), ledger=ledger_url) as b:
        ledger = b.ledger

        def broken_settle(rid, actual):
            raise RuntimeError("disk I/O error")

        ledger.settle = broken_settle  # type: ignore[method-assign]
        with pytest.raises(LedgerError, match="could not settle the budget of call") as exc:
            b.generate("x")
    assert exc.value.result.images and exc.value.result.offering == "mock/x"
    assert statuses(Ledger(ledger_url)) == {"ok": 1}  # the call itself was recorded


async def test_a_running_call_keeps_its_reservation_past_its_ttl(ledger_url):
    url = ledger_url
    async with AsyncBroker(budgeted(["sleep:1.5"], ttl_s=0.3), ledger=url) as b:
        call = asyncio.ensure_future(b.generate("x"))
        await asyncio.sleep(0.9)  # three TTLs: without renewal any process would reconcile it now
        other = Ledger(url)  # as another process would, opening the ledger (`imagebroker costs`)
        assert other.reconcile() == 0
        with other.engine.connect() as conn:
            status, expires = conn.execute(select(reservations.c.status, reservations.c.expires_at)).one()
        assert status == "held" and expires > time.time()
        result = await call
        spent = b.ledger.counters([("all", "total")])[("all", "total")]
    assert spent == (result.cost.usd, Decimal(0))  # charged to the budget, once
    assert statuses(Ledger(url)) == {"ok": 1}


def test_a_settlement_after_the_hold_expired_still_charges_the_budget(ledger_url):
    ledger = Ledger(ledger_url)
    rid = ledger.reserve("r1", [("all", "total", Decimal("1"))], Decimal("0.5"), ttl_s=0.01)
    ledger._unhold(rid)  # as if this process had stalled: nobody renews it
    time.sleep(0.05)
    assert ledger.reconcile() == 1
    ledger.settle(rid, Decimal("0.2"))
    ledger.settle(rid, Decimal("0.2"))  # a retried settle changes nothing
    assert ledger.counters([("all", "total")])[("all", "total")] == (Decimal("0.2"), Decimal(0))


@pytest.mark.postgres
def test_postgres_backends_terminated_during_300_budgeted_calls_lose_nothing(pg_url):
    import psycopg

    schema = pg_url.rsplit("%3D", 1)[1]
    Ledger(pg_url).close()
    stop = threading.Event()
    killed = 0

    def killer() -> None:
        nonlocal killed
        with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                    "AND datname = current_database() AND query NOT ILIKE %s AND application_name = ''",
                    (f"%{schema}%DROP%",)).fetchall()
                killed += sum(1 for (ok,) in rows if ok)
                time.sleep(0.05)

    outcomes = {"ok": 0, "ledger_error_paid": 0, "ledger_error_unpaid": 0}
    returned: list[str] = []
    thread = threading.Thread(target=killer, daemon=True)
    with Broker(budgeted(), ledger=pg_url) as b:
        thread.start()
        try:
            for _ in range(300):
                try:
                    returned.append(b.generate("a cat").request_id)
                    outcomes["ok"] += 1
                except LedgerError as exc:
                    outcomes["ledger_error_paid" if exc.result is not None else "ledger_error_unpaid"] += 1
        finally:
            stop.set()
            thread.join()
    assert killed > 0 and outcomes["ok"] > 0
    ledger = Ledger(pg_url)
    with ledger.engine.connect() as conn:
        ok_rows = set(conn.execute(select(calls.c.request_id).where(calls.c.status == "ok")).scalars())
        spent, reserved = conn.execute(select(budget_counters.c.spent_nusd, budget_counters.c.reserved_nusd)).one()
    assert set(returned) <= ok_rows  # every call returned as done has its row
    assert "pending" not in statuses(ledger), (outcomes, statuses(ledger))
    assert reserved == 0 and spent == len(ok_rows) * 10_000_000  # $0.01 each, charged once
    print(outcomes, "backends killed:", killed)


def test_a_commit_whose_answer_was_lost_is_not_written_twice(pg_url):
    import psycopg

    from imagebroker.broker.report import cost_report

    with Broker(mock_policy(mock_offering("x")), ledger=pg_url) as b:
        b.generate("x")  # the writer's connection is open
        writer, real = b.ledger.writer, b.ledger.writer._run
        lost = []

        def commit_then_lose_the_connection(statements):
            real(statements)
            if not lost:
                lost.append(1)
                raise psycopg.OperationalError("server closed the connection unexpectedly")

        writer._run = commit_then_lose_the_connection
        b.generate("x")
        _, total = cost_report(b.ledger, by="provider")
    assert lost and total.calls == 2 and total.cost_usd == Decimal("0.02")  # each call counted once
    assert statuses(Ledger(pg_url)) == {"ok": 2}


def test_a_pending_row_whose_commit_answer_was_lost_is_not_inserted_twice(pg_url):
    """A budgeted call writes a pending row before it pays; if that commit lands but its answer is lost with
    the connection, the retry must see the row, not insert it again (a duplicate key used to fail the call
    before it ran and leave its row pending for ever: the 300-call fault test caught it once in a while)."""
    import psycopg

    with Broker(budgeted(), ledger=pg_url) as b:
        b.generate("a cat")
        writer, real = b.ledger.writer, b.ledger.writer._run
        lost = []

        def commit_then_lose_the_connection(statements):
            real(statements)
            if not lost and statements[0][0] == writer.sql.insert_call and len(statements) == 1:   # the pending row
                lost.append(1)
                raise psycopg.OperationalError("server closed the connection unexpectedly")

        writer._run = commit_then_lose_the_connection
        result = b.generate("a cat")
    assert lost and result.images
    assert statuses(Ledger(pg_url)) == {"ok": 2}


def test_a_slow_postgresql_ledger_does_not_stall_the_event_loop(pg_url):
    """Each ledger step of a budgeted call (the reservation, the pending row, the settlement, the call's rows)
    is made to take 0.15 s by triggers; a ticker on the same event loop must keep ticking meanwhile."""
    import psycopg

    schema = pg_url.rsplit("%3D", 1)[1]
    Ledger(pg_url).close()   # the tables, migrated
    with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE FUNCTION {schema}.slow() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(0.15); "
                     "RETURN NEW; END $$ LANGUAGE plpgsql")
        for table in ("reservations", "calls"):
            conn.execute(f"CREATE TRIGGER slow_{table} BEFORE INSERT OR UPDATE ON {schema}.{table} "
                         f"FOR EACH ROW EXECUTE FUNCTION {schema}.slow()")

    async def run() -> tuple[float, float, float]:
        gaps, stop = [], asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async with AsyncBroker(budgeted(), ledger=pg_url) as b:
            ticks = asyncio.create_task(ticker())
            started = time.perf_counter()
            await asyncio.gather(*(b.generate(f"call {i}") for i in range(3)))
            took = time.perf_counter() - started
            stop.set()
            await ticks
        return took, max(gaps), len(gaps)

    took, worst_gap, ticks = asyncio.run(run())
    assert took > 0.45   # the triggers did slow every call's ledger steps down
    assert worst_gap < 0.1 and ticks > 20, (took, worst_gap)   # and the loop went on meanwhile
    ledger = Ledger(pg_url)
    assert statuses(ledger) == {"ok": 3}
    ledger.close()
