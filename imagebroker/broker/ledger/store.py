"""The ledger: calls, attempts, budget counters and reservations, on SQLite (default) or PostgreSQL.

Budget checks are atomic across processes: a reservation reads and bumps the budget's counter row
inside one transaction (SQLite `BEGIN IMMEDIATE`, PostgreSQL `SELECT ... FOR UPDATE`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir
from sqlalchemy import create_engine, event, insert, select, update
from sqlalchemy.engine import Connection, Engine

from ...errors import BudgetExceeded, ConfigError, MissingExtra
from .schema import (
    MIGRATIONS,
    ROLLUP_KEYS,
    attempts,
    budget_counters,
    call_tags,
    calls,
    from_nusd,
    latency_bucket,
    migrations_table,
    reservations,
    to_nusd,
)

LEDGER_ENV = "IMAGEBROKER_LEDGER_URL"
HOST = socket.gethostname()
CALL_COLUMNS = tuple(c.name for c in calls.columns)
ATTEMPT_COLUMNS = tuple(c.name for c in attempts.columns if c.name != "id")
UPDATED_COLUMNS = tuple(c for c in CALL_COLUMNS if c != "request_id")  # a pending row, finished
TAG_COLUMNS = tuple(c.name for c in call_tags.columns)


class _Statements:
    """The call-recording SQL, written once per engine's parameter style (`?` or `%s`)."""

    def __init__(self, mark: str) -> None:
        def insert(table: str, cols: tuple[str, ...]) -> str:
            return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))})"

        self.insert_call = insert("calls", CALL_COLUMNS)
        self.insert_attempt = insert("attempts", ATTEMPT_COLUMNS)
        self.insert_tag = insert("call_tags", TAG_COLUMNS)
        sets = ", ".join(f"{c} = {mark}" for c in UPDATED_COLUMNS)
        self.update_call = f"UPDATE calls SET {sets} WHERE request_id = {mark}"

        def upsert(table: str, keys: tuple[str, ...], counts: tuple[str, ...]) -> str:
            adds = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in counts)
            return f"{insert(table, keys + counts)} ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {adds}"

        self.add_call_rollup = upsert("call_rollups", (*ROLLUP_KEYS, "status"),
                                      ("calls", "images", "failures", "cost_nusd", "unpriced"))
        self.add_latency_rollup = upsert("latency_rollups", (*ROLLUP_KEYS, "bucket"), ("calls",))

    def rollups(self, row: Any) -> list[tuple[str, list[list[Any]]]]:
        """The statements that add one finished call row (a mapping) to the per-day rollups."""
        keys = [row["day"], *(row[k] or "" for k in ROLLUP_KEYS[1:])]
        ok, cost = row["status"] == "ok", row["cost_nusd"]
        out = [(self.add_call_rollup, [[*keys, row["status"], 1, row["images"] or 0, 0 if ok else 1,
                                        cost or 0, 1 if ok and cost is None else 0]])]
        if ok and row["latency_s"] is not None:
            out.append((self.add_latency_rollup, [[*keys, latency_bucket(row["latency_s"]), 1]]))
        return out


def default_ledger_url() -> str:
    return f"sqlite:///{Path(user_data_dir('imagebroker', appauthor=False)) / 'ledger.db'}"


def _ln(x: float | None) -> float | None:
    return math.log(x) if x is not None and x > 0 else None


def _floor(x: float | None) -> int | None:
    return math.floor(x) if x is not None else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Ledger:
    """Durable record of calls, attempts, costs and budget reservations."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or os.environ.get(LEDGER_ENV) or default_ledger_url()
        self.engine = self._engine(self.url)
        self.sqlite = self.engine.dialect.name == "sqlite"
        self._sql = _Statements("?" if self.sqlite else "%s")
        self._writer: Any = None  # one DB-API connection, kept for recording calls
        self._write_lock = threading.Lock()
        self.migrate()
        self.reconcile()

    def __repr__(self) -> str:
        return f"Ledger({self.engine.url.render_as_string(hide_password=True)!r})"

    @property
    def path(self) -> str:
        return self.engine.url.database or "" if self.sqlite else self.engine.url.render_as_string(
            hide_password=True)

    @staticmethod
    def _engine(url: str) -> Engine:
        if url.startswith("postgresql"):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise MissingExtra("postgres", "psycopg") from None
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        except Exception as exc:
            raise ConfigError(f"ledger URL {url.split('@')[-1]!r} is not usable: {exc}") from None
        if engine.dialect.name == "sqlite":
            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=30000")
                try:
                    cur.execute("SELECT ln(1.0), floor(1.5)")  # the rollups' latency buckets use them
                except Exception:  # an SQLite built without its math functions
                    dbapi_conn.create_function("ln", 1, _ln, deterministic=True)
                    dbapi_conn.create_function("floor", 1, _floor, deterministic=True)
                cur.close()

            @event.listens_for(engine, "begin")
            def _begin(conn: Connection) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
        return engine

    # -- schema -----------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        applied: list[str] = []
        with self.engine.begin() as conn:
            migrations_table.create(conn, checkfirst=True)
            done = {r[0] for r in conn.execute(select(migrations_table.c.name))}
            for name, fn in MIGRATIONS:
                if name not in done:
                    fn(conn)
                    conn.execute(insert(migrations_table).values(name=name, applied_at=time.time()))
                    applied.append(name)
        return applied

    # -- budgets ----------------------------------------------------------------------------
    def counters(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
        out = {}
        with self.engine.connect() as conn:
            for budget, period in keys:
                row = conn.execute(select(budget_counters.c.spent_nusd, budget_counters.c.reserved_nusd)
                                   .where(budget_counters.c.budget == budget,
                                          budget_counters.c.period == period)).first()
                spent, reserved = (row or (0, 0))
                out[(budget, period)] = (from_nusd(spent) or Decimal(0), from_nusd(reserved) or Decimal(0))
        return out

    def _lock_counter(self, conn: Connection, budget: str, period: str) -> tuple[int, int]:
        key = {"budget": budget, "period": period}
        if self.sqlite:
            conn.exec_driver_sql(
                "INSERT OR IGNORE INTO budget_counters (budget, period, spent_nusd, reserved_nusd) "
                "VALUES (?, ?, 0, 0)", (budget, period))
        else:
            conn.exec_driver_sql(
                "INSERT INTO budget_counters (budget, period, spent_nusd, reserved_nusd) "
                "VALUES (%(budget)s, %(period)s, 0, 0) ON CONFLICT DO NOTHING", key)
        q = select(budget_counters.c.spent_nusd, budget_counters.c.reserved_nusd).where(
            budget_counters.c.budget == budget, budget_counters.c.period == period)
        if not self.sqlite:
            q = q.with_for_update()
        spent, reserved = conn.execute(q).one()
        return int(spent), int(reserved)

    def reserve(self, request_id: str, limits: Sequence[tuple[str, str, Decimal]], amount: Decimal,
                ttl_s: float) -> str:
        """Hold `amount` against every (budget, period, limit), all or none. Raises BudgetExceeded."""
        need = to_nusd(amount) or 0
        rid = uuid.uuid4().hex
        with self.engine.begin() as conn:
            for budget, period, limit in sorted(limits):  # a fixed lock order: no deadlocks
                spent, reserved = self._lock_counter(conn, budget, period)
                if spent + reserved + need > (to_nusd(limit) or 0):
                    raise BudgetExceeded(budget, spent=from_nusd(spent) or Decimal(0),
                                         reserved=from_nusd(reserved) or Decimal(0), limit=limit,
                                         needed=amount)
            for budget, period, _ in limits:
                conn.execute(update(budget_counters).where(
                    budget_counters.c.budget == budget, budget_counters.c.period == period).values(
                    reserved_nusd=budget_counters.c.reserved_nusd + need))
            now = time.time()
            conn.execute(insert(reservations).values(
                id=rid, request_id=request_id, amount_nusd=need, created_at=now,
                expires_at=now + ttl_s, host=HOST, pid=os.getpid(), status="held",
                counters_json=json.dumps([[b, p] for b, p, _ in limits])))
        return rid

    def _finish(self, conn: Connection, rid: str, spent: Decimal | None, status: str) -> None:
        row = conn.execute(select(reservations.c.counters_json, reservations.c.amount_nusd,
                                  reservations.c.status).where(reservations.c.id == rid)).first()
        if row is None or row.status != "held":
            return
        add = to_nusd(spent) or 0
        for budget, period in json.loads(row.counters_json):
            conn.execute(update(budget_counters).where(
                budget_counters.c.budget == budget, budget_counters.c.period == period).values(
                reserved_nusd=budget_counters.c.reserved_nusd - row.amount_nusd,
                spent_nusd=budget_counters.c.spent_nusd + add))
        conn.execute(update(reservations).where(reservations.c.id == rid).values(status=status))

    def settle(self, rid: str, actual: Decimal | None) -> None:
        with self.engine.begin() as conn:
            self._finish(conn, rid, actual, "settled")

    def release(self, rid: str) -> None:
        with self.engine.begin() as conn:
            self._finish(conn, rid, None, "released")

    def reconcile(self) -> int:
        """Release reservations whose process died (same host) or whose time ran out."""
        now, done = time.time(), 0
        with self.engine.begin() as conn:
            held = conn.execute(select(reservations.c.id, reservations.c.host, reservations.c.pid,
                                       reservations.c.expires_at, reservations.c.request_id)
                                .where(reservations.c.status == "held")).all()
            for r in held:
                dead = r.host == HOST and not _pid_alive(r.pid)
                if dead or r.expires_at < now:
                    self._finish(conn, r.id, None, "expired")
                    self._abandon(conn, r.request_id)
                    done += 1
        return done

    def _abandon(self, conn: Connection, request_id: str) -> None:
        """The pending row of a call whose process died becomes `abandoned`, and counts as a failure."""
        done = conn.execute(update(calls).where(calls.c.request_id == request_id, calls.c.status == "pending")
                            .values(status="abandoned", error="process ended mid-call"))
        if done.rowcount:
            row = conn.execute(select(calls).where(calls.c.request_id == request_id)).mappings().one()
            for sql, params in self._sql.rollups(row):
                conn.exec_driver_sql(sql, tuple(params[0]))

    # -- calls ------------------------------------------------------------------------------
    # Recording a call is the one write on every request's path, so it goes straight to the driver on
    # a connection kept open, with statements written once: a quarter of the cost through a pooled
    # SQLAlchemy connection. The transaction still commits before `generate()` returns.
    def _write(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        with self._write_lock:
            for retry in (True, False):
                fresh = self._writer is None
                if fresh:
                    self._writer = self.engine.raw_connection()
                cur = self._writer.cursor()
                try:
                    if self.sqlite:
                        cur.execute("BEGIN IMMEDIATE")
                    for sql, rows in statements:
                        if rows:
                            cur.executemany(sql, rows)
                    self._writer.commit()
                    return
                except Exception:
                    self._drop_writer(invalidate=True)
                    if fresh or not retry:  # a kept connection may have gone stale: one fresh try
                        raise
                finally:
                    cur.close()

    def _drop_writer(self, invalidate: bool = False) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):  # it is being thrown away
                self._writer.invalidate() if invalidate else self._writer.close()
            self._writer = None

    def start_call(self, row: dict[str, Any]) -> None:
        """A pending row, written before a call that holds a reservation (so a crash is visible)."""
        self._write([(self._sql.insert_call, [[row[c] if c != "status" else "pending"
                                                for c in CALL_COLUMNS]])])

    def record_call(self, row: dict[str, Any], attempt_rows: Sequence[dict[str, Any]],
                    tags: dict[str, str], pending: bool = False) -> None:
        if pending:
            call = (self._sql.update_call, [[*(row[c] for c in UPDATED_COLUMNS), row["request_id"]]])
        else:
            call = (self._sql.insert_call, [[row[c] for c in CALL_COLUMNS]])
        self._write([call, *self._sql.rollups(row),
                     (self._sql.insert_attempt, [[a[c] for c in ATTEMPT_COLUMNS] for a in attempt_rows]),
                     (self._sql.insert_tag, [(row["request_id"], k, v) for k, v in tags.items()])])

    def recent_latencies(self, since: float, limit: int = 20_000) -> list[tuple[str, float]]:
        with self.engine.connect() as conn:
            q = (select(calls.c.offering, calls.c.latency_s)
                 .where(calls.c.status == "ok", calls.c.created_at >= since)
                 .order_by(calls.c.created_at.desc()).limit(limit))
            return [(o, float(lat)) for o, lat in conn.execute(q)]

    def close(self) -> None:
        with self._write_lock:
            self._drop_writer()
        self.engine.dispose()
