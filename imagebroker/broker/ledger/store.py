"""The ledger: calls, attempts, budget counters and reservations, on SQLite (default) or PostgreSQL.

Budget checks are atomic across processes: a reservation reads and bumps the budget's counter row
inside one transaction (SQLite `BEGIN IMMEDIATE`, PostgreSQL `SELECT ... FOR UPDATE`).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from platformdirs import user_data_dir
from sqlalchemy import insert, inspect, make_url, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from ...errors import BudgetExceeded, LedgerError, LedgerUnavailable
from .engine import LEDGER_ENV, make_engine
from .lookups import Lookups
from .schema import (
    MIGRATIONS,
    budget_counters,
    calls,
    fill_rollups,
    from_nusd,
    migrations_table,
    reservations,
    to_nusd,
)
from .upkeep import Checkpointer, renew_held
from .writer import CallWriter, retried

T = TypeVar("T")

HOST = socket.gethostname()


def default_ledger_url() -> str:
    return f"sqlite:///{Path(user_data_dir('imagebroker', appauthor=False)) / 'ledger.db'}"


def ledger_url(url: str | None = None) -> str:
    """The ledger a process uses: `url`, else $IMAGEBROKER_LEDGER_URL, else an SQLite file in the user
    data dir. A plain path (no `scheme://`) is an SQLite file."""
    url = url or os.environ.get(LEDGER_ENV) or default_ledger_url()
    if "://" not in url:
        url = f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def shown_url(url: str) -> str:
    """A ledger URL as it may be printed: SQLite as its file path, anything else without its password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return parsed.render_as_string(hide_password=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Ledger(Lookups):
    """Durable record of calls, attempts, costs and budget reservations."""

    def __init__(self, url: str | None = None, *, read_only: bool = False) -> None:
        """`read_only` (what `route`, `providers` and `costs` use): nothing is created or migrated, and a
        ledger that does not exist yet reads as an empty one."""
        self.url = ledger_url(url)
        self.read_only = read_only
        self.engine = make_engine(self.url, create=not read_only)
        if read_only and not self._written_before():
            self.engine = make_engine("sqlite://", create=False)   # empty, in memory, gone at exit
        self.sqlite = self.engine.dialect.name == "sqlite"
        self.writer = CallWriter(self.engine, self.sqlite, self.check_file)
        self._held: dict[str, float] = {}   # reservations this process holds -> their TTL
        self._checkpointer: Checkpointer | None = None
        self._heartbeat: threading.Thread | None = None
        self._lock = threading.Lock()
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (ledger := me()) and ledger._after_fork())
        if not read_only or self.engine.url.database is None:
            self._open_step(self.migrate)
        if not read_only:
            self._open_step(self.reconcile)
        self._inode = self._file_inode()
        writes = self._inode is not None and not read_only
        self._checkpointer = Checkpointer(self.engine.url.database) if writes else None
        if self._checkpointer is not None:  # its thread ends with the ledger, even one never closed
            weakref.finalize(self, self._checkpointer.stop)

    def _after_fork(self) -> None:
        """A forked child gets connections of its own: the parent's stay the parent's."""
        self.engine.dispose(close=False)
        self.writer.after_fork()
        self._held, self._heartbeat, self._lock = {}, None, threading.Lock()
        if self._checkpointer is not None:
            self._checkpointer = Checkpointer(self._checkpointer.path)

    def _file_inode(self) -> int | None:
        database = self.engine.url.database
        if not self.sqlite or not database or database == ":memory:":
            return None
        return os.stat(database).st_ino

    def check_file(self) -> None:
        """An SQLite file deleted or replaced under this process would swallow every later write (into
        an unlinked inode): refuse to write instead."""
        if self._inode is None:
            return
        try:
            same = os.stat(self.engine.url.database or "").st_ino == self._inode
        except OSError:
            same = False
        if not same:
            raise LedgerError(f"the ledger file {self.engine.url.database} was deleted or replaced while this "
                              "process was using it; nothing more is written to it")

    def __repr__(self) -> str:
        return f"Ledger({shown_url(self.url)!r})"

    @property
    def path(self) -> str:
        return shown_url(self.url)

    def _open_step(self, step: Callable[[], object]) -> None:
        """A step of opening the ledger, with a database that is not there said in one line."""
        try:
            step()
        except OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            raise LedgerUnavailable(f"cannot open the ledger {shown_url(self.url)}: {reason} (set --ledger "
                                    f"or ${LEDGER_ENV} to another)") from None

    def _written_before(self) -> bool:
        """Whether a ledger is there to read: an SQLite file that exists, a database with our tables. One
        written by an older imagebroker must be migrated by a command that writes, not read half-way."""
        if self.engine.dialect.name == "sqlite" and not Path(self.engine.url.database or "").exists():
            return False
        done: set[str] = set()

        def read() -> None:
            with self.engine.connect() as conn:
                if inspect(conn).has_table(migrations_table.name):
                    done.update(r[0] for r in conn.execute(select(migrations_table.c.name)))
        self._open_step(read)
        pending = [name for name, _ in MIGRATIONS if name not in done]
        if done and pending:
            raise LedgerUnavailable(f"the ledger {shown_url(self.url)} was written by an older imagebroker: run "
                                    "`imagebroker ledger migrate` (or any generate) to bring it up to date")
        return bool(done)

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
    @retried
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

    @retried
    def reserve(self, request_id: str, limits: Sequence[tuple[str, str, Decimal]], amount: Decimal,
                ttl_s: float, rid: str | None = None) -> str:
        """Hold `amount` against every (budget, period, limit), all or none. Raises BudgetExceeded.
        With the same `rid` again (a retry after the connection dropped), the hold made is returned."""
        need = to_nusd(amount) or 0
        rid = rid or uuid.uuid4().hex
        with self.engine.begin() as conn:
            if conn.execute(select(reservations.c.id).where(reservations.c.id == rid)).first():
                self._hold(rid, ttl_s)
                return rid
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
        self._hold(rid, ttl_s)
        return rid

    # -- keeping held reservations alive ------------------------------------------------------
    def _hold(self, rid: str, ttl_s: float) -> None:
        """While this process lives its reservations are renewed, so that no other process (on
        another host, which cannot see our pid) takes a running call's reservation for abandoned."""
        with self._lock:
            self._held[rid] = ttl_s
            if self._heartbeat is None or not self._heartbeat.is_alive():
                me = weakref.ref(self)
                self._heartbeat = threading.Thread(target=renew_held, args=(me,), name="imagebroker-ledger-renew",
                                                   daemon=True)
                self._heartbeat.start()

    def _unhold(self, rid: str) -> None:
        with self._lock:
            self._held.pop(rid, None)

    def renew(self) -> int:
        """Push the expiry of every reservation this process holds to now + its TTL."""
        with self._lock:
            held = dict(self._held)
        now = time.time()
        with self.engine.begin() as conn:
            for rid, ttl in held.items():
                conn.execute(update(reservations).where(reservations.c.id == rid, reservations.c.status == "held")
                             .values(expires_at=now + ttl))
        return len(held)

    def _finish(self, conn: Connection, rid: str, spent: Decimal | None, status: str) -> None:
        row = conn.execute(select(reservations.c.counters_json, reservations.c.amount_nusd,
                                  reservations.c.status).where(reservations.c.id == rid)).first()
        add = to_nusd(spent) or 0
        if row is None or row.status in ("settled", "released", "late-settled"):
            return  # done already (this is a retry)
        held = row.status == "held"
        if not held and not (status == "settled" and add):
            return
        for budget, period in json.loads(row.counters_json):  # an expired hold was released already: a
            conn.execute(update(budget_counters).where(          # late settlement still charges the spend
                budget_counters.c.budget == budget, budget_counters.c.period == period).values(
                reserved_nusd=budget_counters.c.reserved_nusd - (row.amount_nusd if held else 0),
                spent_nusd=budget_counters.c.spent_nusd + add))
        conn.execute(update(reservations).where(reservations.c.id == rid).values(
            status=status if held else "late-settled"))

    @retried
    def settle(self, rid: str, actual: Decimal | None) -> None:
        with self.engine.begin() as conn:
            self._finish(conn, rid, actual, "settled")
        self._unhold(rid)

    @retried
    def release(self, rid: str) -> None:
        with self.engine.begin() as conn:
            self._finish(conn, rid, None, "released")
        self._unhold(rid)

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
            for sql, params in self.writer.sql.rollups(row):
                conn.exec_driver_sql(sql, tuple(params[0]))

    # -- calls (see writer.py) -------------------------------------------------------------
    async def off_loop(self, step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking ledger step taken from async code: at once on SQLite, whose commit (WAL, synchronous=NORMAL)
        takes ~0.1 ms and where a thread hop costs more than it saves (it contends for the GIL); in a worker
        thread on a server database, where each step is a network round trip the event loop must not wait
        out. The step runs to its end even if the caller is cancelled meanwhile."""
        if self.sqlite:
            return step(*args, **kwargs)
        return await asyncio.to_thread(step, *args, **kwargs)

    def start_call(self, row: dict[str, Any]) -> None:
        """A pending row, written before a call that holds a reservation (so a crash is visible)."""
        self.writer.write(self.writer.sql.pending(row), keep=False)

    def record_call(self, row: Mapping[str, Any], attempt_rows: Sequence[Mapping[str, Any]],
                    skip_rows: Sequence[Mapping[str, Any]], tags: Mapping[str, str], pending: bool = False) -> None:
        """A finished call, its attempts, skips and tags, and its share of the rollups, in one
        transaction."""
        self.writer.write(self.writer.sql.finished(row, attempt_rows, skip_rows, tags, pending))

    async def arecord_call(self, row: Mapping[str, Any], attempt_rows: Sequence[Mapping[str, Any]],
                           skip_rows: Sequence[Mapping[str, Any]], tags: Mapping[str, str],
                           pending: bool = False) -> None:
        """`record_call` from an event loop: committed with the other calls finishing alongside."""
        await self.writer.awrite(self.writer.sql.finished(row, attempt_rows, skip_rows, tags, pending))

    def rebuild_rollups(self) -> None:
        """Recompute the report's per-day rollups from the call rows (after editing rows by hand)."""
        with self.engine.begin() as conn:
            fill_rollups(conn)

    def close(self) -> None:
        self.writer.close()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.engine.dispose()

