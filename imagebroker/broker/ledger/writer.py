"""Recording calls: the one ledger write on every request's path.

It goes straight to the driver on a connection kept open, with its SQL written once per engine (from
the SQLAlchemy tables): about a third of the cost of a pooled SQLAlchemy connection. A call alone on
its broker writes at once (`write`); while several are under way, those that finish in the same
event-loop iteration share one transaction (`awrite`, a group commit). Either way `generate()` returns
only after its own rows are committed, so a crash never loses a call that was reported as done. On SQLite
the commit runs on the event loop (WAL with synchronous=NORMAL: ~0.1 ms; a writer thread was tried and,
contending for the GIL with the event loop, halved throughput); on a server database it runs in a worker
thread, since each commit is a network round trip the loop must not wait out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from ...logs import logger
from .schema import ROLLUP_KEYS, ROLLUP_MEASURES, attempts, call_tags, calls, latency_bucket, skips

T = TypeVar("T")

CALL_COLUMNS = tuple(c.name for c in calls.columns)
ATTEMPT_COLUMNS = tuple(c.name for c in attempts.columns if c.name != "id")
UPDATED_COLUMNS = tuple(c for c in CALL_COLUMNS if c != "request_id")  # a pending row, finished
TAG_COLUMNS = tuple(c.name for c in call_tags.columns)
SKIP_COLUMNS = tuple(c.name for c in skips.columns if c.name != "id")

Statements = list[tuple[str, list[Sequence[Any]]]]  # (SQL, rows for executemany), in order


def lost_connection(exc: BaseException, engine: Engine) -> bool:
    """Whether `exc` (the driver's own, or SQLAlchemy's wrapping of it) says the connection failed,
    not the statement: worth one try on a fresh connection. The one place this is decided."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig or exc
    if engine.dialect.name == "sqlite":
        return False  # SQLite has no connection to lose: its errors are the statement's or the file's
    dbapi = engine.dialect.dbapi
    kinds = tuple(getattr(dbapi, name) for name in ("OperationalError", "InterfaceError") if hasattr(dbapi, name))
    return isinstance(exc, kinds)


def retried(fn: Callable[..., T]) -> Callable[..., T]:
    """A ledger step run again, once, on a fresh connection when the connection (not the statement)
    failed: a PostgreSQL backend terminated, a socket reset. Each step is idempotent by its ids."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        self.check_file()
        try:
            return fn(self, *args, **kwargs)
        except DBAPIError as exc:
            if not lost_connection(exc, self.engine):
                raise
            return fn(self, *args, **kwargs)

    return wrapper


class CallSQL:
    """The call-recording SQL in the engine's parameter style (`?` for SQLite, `%s` for psycopg)."""

    def __init__(self, mark: str) -> None:
        def insert(table: str, cols: tuple[str, ...]) -> str:
            return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))})"

        def upsert(table: str, keys: tuple[str, ...], counts: tuple[str, ...]) -> str:
            adds = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in counts)
            return f"{insert(table, keys + counts)} ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {adds}"

        self.insert_call = insert("calls", CALL_COLUMNS)
        self.update_call = (f"UPDATE calls SET {', '.join(f'{c} = {mark}' for c in UPDATED_COLUMNS)} "
                            f"WHERE request_id = {mark}")
        self.insert_attempt = insert("attempts", ATTEMPT_COLUMNS)
        self.insert_tag = insert("call_tags", TAG_COLUMNS)
        self.insert_skip = insert("skips", SKIP_COLUMNS)
        self.add_call_rollup = upsert("call_rollups", (*ROLLUP_KEYS, "status"), ROLLUP_MEASURES)
        self.add_latency_rollup = upsert("latency_rollups", (*ROLLUP_KEYS, "bucket"), ("calls",))

    def written_calls(self, statements: Statements) -> dict[str, str]:
        """request id -> status of the call rows that `statements` write, a pending row's too (a pending
        row whose commit landed but whose answer was lost must not be inserted again: the duplicate key
        would fail the call's start and leave the row pending for ever)."""
        status_at, out = CALL_COLUMNS.index("status"), {}
        for sql, rows in statements:
            if sql == self.insert_call:
                out |= {r[0]: r[status_at] for r in rows}
            elif sql == self.update_call:
                out |= {r[-1]: r[UPDATED_COLUMNS.index("status")] for r in rows}
        return out

    def pending(self, row: Mapping[str, Any]) -> Statements:
        return [(self.insert_call, [[row[c] if c != "status" else "pending" for c in CALL_COLUMNS]])]

    def finished(self, row: Mapping[str, Any], attempt_rows: Sequence[Mapping[str, Any]],
                 skip_rows: Sequence[Mapping[str, Any]], tags: Mapping[str, str], pending: bool) -> Statements:
        if pending:  # its pending row exists: complete it
            call = (self.update_call, [[*(row[c] for c in UPDATED_COLUMNS), row["request_id"]]])
        else:
            call = (self.insert_call, [[row[c] for c in CALL_COLUMNS]])
        return [call, *self.rollups(row),
                (self.insert_attempt, [[a[c] for c in ATTEMPT_COLUMNS] for a in attempt_rows]),
                (self.insert_skip, [[s[c] for c in SKIP_COLUMNS] for s in skip_rows]),
                (self.insert_tag, [(row["request_id"], k, v) for k, v in tags.items()])]

    def rollups(self, row: Mapping[str, Any]) -> Statements:
        """What adds one finished call row to the per-day rollups."""
        keys = [row["day"], *(row[k] or "" for k in ROLLUP_KEYS[1:])]
        ok, cost = row["status"] == "ok", row["cost_nusd"]
        out: Statements = [(self.add_call_rollup, [[*keys, row["status"], 1, row["images"] or 0,
                                                    0 if ok else 1, cost or 0,
                                                    1 if ok and cost is None else 0,
                                                    row.get("adapter_errors") or 0, row.get("over_bound") or 0,
                                                    row.get("cached") or 0, row.get("saved_nusd") or 0]])]
        if ok and row["latency_s"] is not None and not row.get("cached"):   # a cache hit says nothing of speed
            out.append((self.add_latency_rollup, [[*keys, latency_bucket(row["latency_s"]), 1]]))
        return out


def merged(batches: Sequence[Statements]) -> Statements:
    """Several calls' statements as one executemany per SQL text, in first-seen order."""
    by_sql: dict[str, list[Sequence[Any]]] = {}
    for statements in batches:
        for sql, rows in statements:
            by_sql.setdefault(sql, []).extend(rows)
    return list(by_sql.items())


class CallWriter:
    """Writes call rows on one kept DB-API connection; thread-safe, and batched per event loop."""

    def __init__(self, engine: Engine, sqlite: bool, check: Callable[[], None] = lambda: None) -> None:
        self.engine, self.sqlite, self.check = engine, sqlite, check
        self.backlog: list[Statements] = []  # written when the database is reachable again
        self.sql = CallSQL("?" if sqlite else "%s")
        self._conn: Any = None
        self._lock = threading.Lock()
        self._queues: dict[asyncio.AbstractEventLoop, list[tuple[Statements, asyncio.Future[None]]]] = {}

    def write(self, statements: Statements, keep: bool = True) -> None:
        """One transaction, committed before this returns. A connection that fails (a PostgreSQL
        backend terminated, a reset socket) is replaced and the transaction tried once more; if that
        fails too, the statements are kept and written before the next write that succeeds (or at
        close), and the error is raised: the caller reports the call as unrecorded, for now. (`keep`
        False: not kept, for a pending row whose call does not go ahead without it.)"""
        self.check()
        with self._lock:
            try:
                self._write(statements)
            except Exception as exc:
                if keep and self._lost_connection(exc):
                    self.backlog.append(statements)
                raise
            while self.backlog:
                try:
                    self._write(self.backlog[0])
                except Exception as exc:
                    if self._lost_connection(exc):
                        return  # still unreachable: kept for the next time
                    logger.error("dropped %d unrecorded statement(s) the ledger refuses: %s",
                                 len(self.backlog[0]), type(exc).__name__)
                self.backlog.pop(0)

    def _write(self, statements: Statements) -> None:
        for last in (False, True):
            if self._conn is None:
                self._conn = self.engine.raw_connection()
            try:
                if last and self._committed_already(statements):
                    return  # the lost connection had committed it: writing again would count it twice
                self._run(statements)
                return
            except Exception as exc:
                if not self._lost_connection(exc) and self._rolled_back():
                    raise  # the statements failed, not the connection
                self._drop()
                if last:
                    raise

    def _committed_already(self, statements: Statements) -> bool:
        """Whether the call rows these statements write are in the ledger with the status they write (a
        commit whose acknowledgement was lost with the connection)."""
        want = self.sql.written_calls(statements)
        if not want:
            return False
        cur = self._conn.cursor()
        try:
            mark = "?" if self.sqlite else "%s"
            cur.execute(f"SELECT request_id, status FROM calls WHERE request_id IN ({', '.join([mark] * len(want))})",
                        list(want))
            found = dict(cur.fetchall())
            self._conn.rollback()
        finally:
            with contextlib.suppress(Exception):
                cur.close()
        return all(found.get(rid) == status for rid, status in want.items())

    def _lost_connection(self, exc: BaseException) -> bool:
        return lost_connection(exc, self.engine)

    def _run(self, statements: Statements) -> None:
        cur = self._conn.cursor()
        try:
            if self.sqlite:
                cur.execute("BEGIN IMMEDIATE")
            for sql, rows in statements:
                if len(rows) == 1:  # the usual case: cheaper than executemany's setup
                    cur.execute(sql, rows[0])
                elif rows:
                    cur.executemany(sql, rows)
            self._conn.commit()
        finally:
            with contextlib.suppress(Exception):
                cur.close()

    def _rolled_back(self) -> bool:
        try:
            self._conn.rollback()
            return True
        except Exception:
            return False

    async def awrite(self, statements: Statements) -> None:
        """`write`, committed together with the other calls that finish in this loop iteration."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()  # one per call: cancelling one cancels no other
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = []
            loop.call_soon(self._flush, loop)
        queue.append((statements, done))
        await done

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """This iteration's calls, in one transaction: on the loop for SQLite (a local commit, ~0.1 ms), in a
        worker thread for a server database (a network round trip the loop must not wait out)."""
        batch = self._queues.pop(loop, [])
        if self.sqlite:
            self._answer(batch, self._commit(batch))
        else:
            loop.run_in_executor(None, self._commit, batch).add_done_callback(
                lambda written: self._answer(batch, _outcomes(written, len(batch))))

    def _commit(self, batch: list[tuple[Statements, asyncio.Future[None]]]) -> list[BaseException | None]:
        """The batch written together, else one call by one (one bad call must not sink the others): what each
        call's write raised, or None."""
        try:
            self.write(merged([s for s, _ in batch]))
            return [None] * len(batch)
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
        outcomes: list[BaseException | None] = []
        for statements, _ in batch:
            try:
                self.write(statements)
                outcomes.append(None)
            except Exception as one:
                outcomes.append(one)
        return outcomes

    @staticmethod
    def _answer(batch: list[tuple[Statements, asyncio.Future[None]]], outcomes: list[BaseException | None]) -> None:
        for (_, done), error in zip(batch, outcomes, strict=True):
            if done.done():
                continue  # its caller was cancelled; the rows are written all the same
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def flush_all(self) -> None:
        """Write what is queued for loops that stopped before their flush ran (a running loop flushes
        its own)."""
        for loop in list(self._queues):
            if not loop.is_running():
                batch = self._queues.pop(loop, [])
                self._answer(batch, self._commit(batch))

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connection and queues (SQLite forbids sharing them)."""
        self._conn, self._lock, self._queues, self.backlog = None, threading.Lock(), {}, []

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # it is being thrown away
                self._conn.invalidate()
            self._conn = None

    def flush_backlog(self) -> bool:
        """Try again what could not be written; True when nothing is left unwritten."""
        if self.backlog:
            with contextlib.suppress(Exception):
                self.write([])
        return not self.backlog

    def close(self) -> None:
        self.flush_all()
        self.flush_backlog()
        with self._lock:
            self._drop()


def _outcomes(written: asyncio.Future[list[BaseException | None]], calls: int) -> list[BaseException | None]:
    """What a commit in a worker thread answered; whatever it raised, for every call of its batch."""
    try:
        return written.result()
    except BaseException as exc:
        return [exc] * calls
