"""Opening the ledger's database: the SQLite pragmas (WAL, our own BEGIN IMMEDIATE, checkpoints off the
request path, the math functions the rollups need), psycopg for PostgreSQL, a folder for a new file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from ...errors import ConfigError, LedgerUnavailable, MissingExtra

LEDGER_ENV = "IMAGEBROKER_LEDGER_URL"


def _ln(x: float | None) -> float | None:
    return math.log(x) if x is not None and x > 0 else None


def _floor(x: float | None) -> int | None:
    return math.floor(x) if x is not None else None


def make_engine(url: str, *, create: bool) -> Engine:
    """An engine for `url`; `create`: make the folder of a new SQLite file (read-only commands do not)."""
    if url.startswith("postgresql"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise MissingExtra("postgres", "psycopg") from None
    if url.startswith("sqlite:///") and create:
        folder = Path(url.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerUnavailable(f"cannot create the ledger's folder {folder}: {exc.strerror} (set "
                                    f"--ledger or ${LEDGER_ENV} to another)") from None
    memory = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}} if url == "sqlite://" else {}
    try:
        engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"), **memory)
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
            cur.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run off the request path (below)
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

