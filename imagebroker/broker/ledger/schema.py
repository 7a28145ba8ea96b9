"""The ledger's tables (the final schema, for queries) and its named, append-only migrations.

Money is stored as integer nano-USD (BIGINT): exact on both engines, and summable in SQL. Never
edit a migration that has shipped; append a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

NANO = Decimal(1_000_000_000)


def to_nusd(usd: Decimal | None) -> int | None:
    return None if usd is None else int((usd * NANO).to_integral_value())


def from_nusd(n: int | None) -> Decimal | None:
    return None if n is None else (Decimal(int(n)) / NANO).normalize()


def _v1_tables(md: MetaData) -> dict[str, Table]:
    calls = Table(
        "calls", md,
        Column("request_id", String(40), primary_key=True),
        Column("created_at", Float, nullable=False, index=True),  # unix seconds, UTC
        Column("day", String(10), nullable=False, index=True),    # YYYY-MM-DD, UTC
        Column("status", String(16), nullable=False),             # pending ok error rejected abandoned
        Column("offering", String(200)),
        Column("provider", String(64)),
        Column("n", Integer, nullable=False),
        Column("images", Integer, nullable=False, default=0),
        Column("width", Integer),
        Column("height", Integer),
        Column("seed", BigInteger),
        Column("policy", String(200)),
        Column("rule", String(200)),
        Column("attempts", Integer, nullable=False, default=0),
        Column("latency_s", Float),
        Column("estimated_nusd", BigInteger),
        Column("cost_nusd", BigInteger),
        Column("cost_status", String(16)),
        Column("cost_unit", String(32)),
        Column("usage_json", Text),
        Column("catalog_version", String(64)),
        Column("prompt_sha256", String(64), nullable=False),
        Column("prompt", Text),
        Column("image_sha256s", Text),
        Column("tags_json", Text),
        Column("error_type", String(64)),
        Column("error", Text),
    )
    attempts = Table(
        "attempts", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("request_id", String(40), nullable=False, index=True),
        Column("number", Integer, nullable=False),
        Column("offering", String(200), nullable=False),
        Column("provider", String(64), nullable=False),
        Column("started_at", Float, nullable=False),
        Column("latency_s", Float, nullable=False),
        Column("status", String(16), nullable=False),
        Column("error_type", String(64)),
        Column("error", Text),
        Column("http_status", Integer),
        Column("provider_request_id", String(200)),
        Column("cost_nusd", BigInteger),
        Column("cost_status", String(16)),
        Column("usage_json", Text),
    )
    call_tags = Table(
        "call_tags", md,
        Column("request_id", String(40), primary_key=True),
        Column("key", String(64), primary_key=True),
        Column("value", String(256), nullable=False),
    )
    budget_counters = Table(
        "budget_counters", md,
        Column("budget", String(200), primary_key=True),
        Column("period", String(16), primary_key=True),   # 2026-11-22, 2026-W47, 2026-11, total
        Column("spent_nusd", BigInteger, nullable=False, default=0),
        Column("reserved_nusd", BigInteger, nullable=False, default=0),
    )
    reservations = Table(
        "reservations", md,
        Column("id", String(40), primary_key=True),
        Column("request_id", String(40), nullable=False),
        Column("counters_json", Text, nullable=False),     # [[budget, period], ...]
        Column("amount_nusd", BigInteger, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("expires_at", Float, nullable=False),
        Column("host", String(200), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("status", String(16), nullable=False),      # held settled released expired
    )
    return {t.name: t for t in (calls, attempts, call_tags, budget_counters, reservations)}


metadata = MetaData()
TABLES = _v1_tables(metadata)  # unchanged since m001; later changes go in new migrations
calls, attempts, call_tags = TABLES["calls"], TABLES["attempts"], TABLES["call_tags"]
budget_counters, reservations = TABLES["budget_counters"], TABLES["reservations"]

migrations_table = Table(
    "imagebroker_migrations", MetaData(),
    Column("name", String(100), primary_key=True),
    Column("applied_at", Float, nullable=False),
)

Migration = Callable[[Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_initial(conn: Connection) -> None:
    md = MetaData()
    for table in _v1_tables(md).values():
        table.create(conn)


@migration
def m002_report_indexes(conn: Connection) -> None:
    conn.exec_driver_sql("CREATE INDEX ix_calls_offering_created ON calls (offering, created_at)")
    conn.exec_driver_sql("CREATE INDEX ix_reservations_status ON reservations (status)")
