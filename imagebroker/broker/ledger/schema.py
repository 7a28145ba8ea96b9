"""The ledger's tables (the final schema, for queries) and its named, append-only migrations.

Money is stored as integer nano-USD (BIGINT): exact on both engines, and summable in SQL. Never
edit a migration that has shipped; append a new one.

Two rollup tables keep per-day sums, updated in the transaction that records each call, so that the
costs report reads thousands of rows rather than millions: `call_rollups` (calls, images, failures,
cost, unpriced per day x provider x offering x policy x rule x status) and `latency_rollups` (a
latency histogram per day x provider x offering x policy x rule, in buckets 1% wide). Absent keys
are stored as '' there, so that the upsert's conflict target matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    case,
    cast,
    delete,
    func,
    insert,
    select,
)

NANO = Decimal(1_000_000_000)
BUCKETS_PER_E = 100  # latency bucket = floor(ln(milliseconds) * 100): each bucket is 1% wide


def to_nusd(usd: Decimal | None) -> int | None:
    return None if usd is None else int((usd * NANO).to_integral_value())


def from_nusd(n: int | None) -> Decimal | None:
    return None if n is None else (Decimal(int(n)) / NANO).normalize()


def latency_bucket(latency_s: float) -> int:
    """The histogram bucket of a latency; latencies under a millisecond share bucket 0."""
    return int(math.log(latency_s * 1000) * BUCKETS_PER_E) if latency_s >= 0.001 else 0


def bucket_latency_s(bucket: int) -> float:
    """A bucket's middle, in seconds: within 0.5% of every latency in it."""
    return math.exp((bucket + 0.5) / BUCKETS_PER_E) / 1000


def _v1_tables(md: MetaData) -> dict[str, Table]:
    calls = Table(
        "calls", md,
        Column("request_id", String(40), primary_key=True),
        Column("created_at", Float, nullable=False, index=True),  # unix seconds, UTC
        Column("day", String(10), nullable=False, index=True),    # YYYY-MM-DD, UTC
        Column("status", String(16), nullable=False),             # pending ok error rejected cancelled abandoned
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


ROLLUP_KEYS = ("day", "provider", "offering", "policy", "rule")


def _v3_tables(md: MetaData) -> dict[str, Table]:
    def keys() -> list[Column]:
        return [Column("day", String(10), primary_key=True), Column("provider", String(64), primary_key=True),
                Column("offering", String(200), primary_key=True),
                Column("policy", String(200), primary_key=True), Column("rule", String(200), primary_key=True)]

    call_rollups = Table(
        "call_rollups", md, *keys(),
        Column("status", String(16), primary_key=True),
        Column("calls", BigInteger, nullable=False),
        Column("images", BigInteger, nullable=False),
        Column("failures", BigInteger, nullable=False),
        Column("cost_nusd", BigInteger, nullable=False),
        Column("unpriced", BigInteger, nullable=False),
    )
    latency_rollups = Table(
        "latency_rollups", md, *keys(),
        Column("bucket", Integer, primary_key=True),
        Column("calls", BigInteger, nullable=False),
    )
    return {t.name: t for t in (call_rollups, latency_rollups)}


metadata = MetaData()
TABLES = _v1_tables(metadata)  # unchanged since m001; later changes go in new migrations
TABLES.update(_v3_tables(metadata))
TABLES["calls"].append_column(Column("idempotency_key", String(200), index=True))  # m004


def _v5_skips(md: MetaData) -> Table:
    return Table(
        "skips", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("request_id", String(40), nullable=False, index=True),
        Column("number", Integer, nullable=False),            # order among the call's skips
        Column("offering", String(200), nullable=False),
        Column("provider", String(64), nullable=False),
        Column("reason", String(32), nullable=False),         # types.SkipReason
        Column("detail", Text),
        Column("at", Float, nullable=False),
    )


TABLES["skips"] = _v5_skips(metadata)  # m005
TABLES["calls"].append_column(Column("adapter_errors", Integer, nullable=False, server_default="0"))
TABLES["call_rollups"].append_column(Column("adapter_errors", BigInteger, nullable=False, server_default="0"))
TABLES["calls"].append_column(Column("over_bound", Integer, nullable=False, server_default="0"))
TABLES["call_rollups"].append_column(Column("over_bound", BigInteger, nullable=False, server_default="0"))
for _column in (Column("cached", Integer, nullable=False, server_default="0"),   # m007
                Column("saved_nusd", BigInteger),          # what the call answered from the cache first cost
                Column("cache_key", String(64), index=True),
                Column("store_url", Text),                 # where its images are (the image store), if stored
                Column("c2pa", Integer, nullable=False, server_default="0")):   # images with content credentials
    TABLES["calls"].append_column(_column)
TABLES["calls"].append_column(Column("request_json", Text))   # m008: what the planner read (never the prompt)
TABLES["call_rollups"].append_column(Column("cache_hits", BigInteger, nullable=False, server_default="0"))
TABLES["call_rollups"].append_column(Column("saved_nusd", BigInteger, nullable=False, server_default="0"))
calls, attempts, call_tags = TABLES["calls"], TABLES["attempts"], TABLES["call_tags"]
budget_counters, reservations = TABLES["budget_counters"], TABLES["reservations"]
call_rollups, latency_rollups, skips = TABLES["call_rollups"], TABLES["latency_rollups"], TABLES["skips"]

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


ROLLUP_MEASURES = ("calls", "images", "failures", "cost_nusd", "unpriced", "adapter_errors", "over_bound",
                   "cache_hits", "saved_nusd")


def call_sums() -> tuple[ColumnElement[Any], ...]:
    """Over call rows, the rollups' measures (ROLLUP_MEASURES, in order)."""
    ok = calls.c.status == "ok"
    return (func.count(), func.coalesce(func.sum(calls.c.images), 0), func.sum(case((~ok, 1), else_=0)),
            func.coalesce(func.sum(calls.c.cost_nusd), 0),
            func.sum(case((and_(ok, calls.c.cost_nusd.is_(None)), 1), else_=0)),
            func.coalesce(func.sum(calls.c.adapter_errors), 0), func.coalesce(func.sum(calls.c.over_bound), 0),
            func.coalesce(func.sum(calls.c.cached), 0), func.coalesce(func.sum(calls.c.saved_nusd), 0))


def latency_bucket_sql() -> ColumnElement[Any]:
    """`latency_bucket` of a call row's latency, in SQL."""
    ms = calls.c.latency_s * 1000
    return case((ms < 1, 0), else_=cast(func.floor(func.ln(ms) * BUCKETS_PER_E), Integer))


def fill_rollups(conn: Connection) -> None:
    """(Re)compute both rollup tables from the call rows (after a migration, or rows edited by hand)."""
    conn.execute(delete(call_rollups))
    conn.execute(delete(latency_rollups))
    keys = [calls.c.day, *(func.coalesce(calls.c[k], "") for k in ROLLUP_KEYS[1:])]
    conn.execute(insert(call_rollups).from_select(
        [*ROLLUP_KEYS, "status", *ROLLUP_MEASURES],
        select(*keys, calls.c.status, *call_sums()).where(calls.c.status != "pending")
        .group_by(*keys, calls.c.status)))
    bucket = latency_bucket_sql()
    conn.execute(insert(latency_rollups).from_select(
        [*ROLLUP_KEYS, "bucket", "calls"],
        select(*keys, bucket, func.count()).where(calls.c.status == "ok", calls.c.cached == 0,
                                                  calls.c.latency_s.is_not(None))
        .group_by(*keys, bucket)))


@migration
def m003_rollups(conn: Connection) -> None:
    """Per-day rollups for the costs report, filled from the calls already recorded."""
    for table in _v3_tables(MetaData()).values():
        table.create(conn)
    _fill_v3_rollups(conn)


def _fill_v3_rollups(conn: Connection) -> None:
    """m003's fill, as the tables were then (before m005 added adapter_errors)."""
    keys = ", ".join(f"coalesce({k}, '')" if k != "day" else k for k in ROLLUP_KEYS)
    conn.exec_driver_sql(
        f"INSERT INTO call_rollups ({', '.join(ROLLUP_KEYS)}, status, calls, images, failures, cost_nusd, "
        f"unpriced) SELECT {keys}, status, count(*), coalesce(sum(images), 0), "
        "sum(CASE WHEN status != 'ok' THEN 1 ELSE 0 END), coalesce(sum(cost_nusd), 0), "
        "sum(CASE WHEN status = 'ok' AND cost_nusd IS NULL THEN 1 ELSE 0 END) FROM calls "
        f"WHERE status != 'pending' GROUP BY {keys}, status")
    bucket = "CASE WHEN latency_s * 1000 < 1 THEN 0 ELSE CAST(floor(ln(latency_s * 1000) * 100) AS INTEGER) END"
    conn.exec_driver_sql(
        f"INSERT INTO latency_rollups ({', '.join(ROLLUP_KEYS)}, bucket, calls) SELECT {keys}, {bucket}, "
        f"count(*) FROM calls WHERE status = 'ok' AND latency_s IS NOT NULL GROUP BY {keys}, {bucket}")


@migration
def m004_idempotency_key(conn: Connection) -> None:
    """The caller's idempotency key on each call, so that a repeat is recognised across processes."""
    conn.exec_driver_sql("ALTER TABLE calls ADD COLUMN idempotency_key VARCHAR(200)")
    conn.exec_driver_sql("CREATE INDEX ix_calls_idempotency_key ON calls (idempotency_key)")


@migration
def m005_skips_adapter_errors_over_bound(conn: Connection) -> None:
    """Skipped offerings get a table of their own (they were stored as fake failed attempts); each call
    counts its adapter errors (bugs, not outages) and flags a settled cost above the bound its budget
    reserved; both are summed per day in the rollups."""
    _v5_skips(MetaData()).create(conn)
    for column in ("adapter_errors", "over_bound"):
        conn.exec_driver_sql(f"ALTER TABLE calls ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
        conn.exec_driver_sql(f"ALTER TABLE call_rollups ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0")
    # skips recorded before as fake attempts (no latency, no request sent) move to their table
    fake = "error_type IN ('CircuitOpen', 'BudgetExceeded') AND latency_s = 0"
    conn.exec_driver_sql(
        "INSERT INTO skips (request_id, number, offering, provider, reason, detail, at) "
        "SELECT request_id, number, offering, provider, CASE WHEN error_type = 'CircuitOpen' THEN "
        "'circuit_open' WHEN substr(error, 1, 13) = 'price unknown' THEN 'price_unknown' ELSE 'over_budget' END, "
        f"error, started_at FROM attempts WHERE {fake}")
    conn.exec_driver_sql(f"DELETE FROM attempts WHERE {fake}")


@migration
def m006_drop_unread_call_indexes(conn: Connection) -> None:
    """Two indexes nothing reads any more (the report reads rollups, and its edge days by created_at):
    each call's write no longer maintains them."""
    conn.exec_driver_sql("DROP INDEX ix_calls_day")
    conn.exec_driver_sql("DROP INDEX ix_calls_offering_created")


@migration
def m007_image_store_and_cache(conn: Connection) -> None:
    """Each call says where its images are stored, whether it was answered from the cache (and what the
    call it repeats cost), the key a later identical request finds it by, and how many of its images
    carry C2PA content credentials; the rollups count cache hits and what they saved."""
    for column, kind in (("cached", "INTEGER NOT NULL DEFAULT 0"), ("saved_nusd", "BIGINT"),
                         ("cache_key", "VARCHAR(64)"), ("store_url", "TEXT"), ("c2pa", "INTEGER NOT NULL DEFAULT 0")):
        conn.exec_driver_sql(f"ALTER TABLE calls ADD COLUMN {column} {kind}")
    conn.exec_driver_sql("CREATE INDEX ix_calls_cache_key ON calls (cache_key)")
    for column in ("cache_hits", "saved_nusd"):
        conn.exec_driver_sql(f"ALTER TABLE call_rollups ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0")


@migration
def m008_planning_fields(conn: Connection) -> None:
    """Each call keeps the request fields the planner reads (size, n, quality, steps, adapters by reference and
    hash, the prompt's length but never its text), so that `imagebroker whatif` can plan it again."""
    conn.exec_driver_sql("ALTER TABLE calls ADD COLUMN request_json TEXT")


def _v9_gateway_keys(md: MetaData) -> Table:
    return Table(
        "gateway_keys", md,
        Column("name", String(200), primary_key=True),
        Column("key_sha256", String(64), nullable=False, unique=True),   # the key itself is never stored
        Column("prefix", String(16), nullable=False),        # what `keys list` shows of it
        Column("tags_json", Text, nullable=False),           # added to every call made with the key
        Column("budget_nusd", BigInteger),                   # its own budget (None: none), per `budget_period`
        Column("budget_period", String(8)),
        Column("admin", Integer, nullable=False, server_default="0"),
        Column("allow_json", Text),                          # offering patterns it may use (None: any)
        Column("webhook_url", Text),                         # where its finished jobs are announced
        Column("webhook_secret", String(64)),                # what signs those announcements (HMAC-SHA256)
        Column("created_at", Float, nullable=False),
        Column("revoked_at", Float),
    )


TABLES["gateway_keys"] = gateway_keys = _v9_gateway_keys(metadata)   # m009


@migration
def m009_gateway_keys(conn: Connection) -> None:
    """The team gateway's keys: a name, the SHA-256 of the key (shown once, never stored), the tags and the
    budget its calls carry, whether it is an admin key, the offerings it may use, and the webhook its finished
    jobs are announced to (with the secret that signs them)."""
    _v9_gateway_keys(MetaData()).create(conn)


def _v10_gateway_jobs(md: MetaData) -> Table:
    return Table(
        "gateway_jobs", md,
        Column("id", String(40), primary_key=True),
        Column("key_name", String(200)),                     # the gateway key it was submitted with
        Column("status", String(16), nullable=False, index=True),   # queued running done failed
        Column("request_json", Text, nullable=False),        # generate()'s fields (tags and all)
        Column("created_at", Float, nullable=False),
        Column("started_at", Float),
        Column("finished_at", Float),
        Column("worker", String(200)),                       # host:pid of the process running it
        Column("http_status", Integer),                      # what the call would have answered
        Column("response_json", Text),                       # that answer (images by SHA-256, in the store)
    )


TABLES["gateway_jobs"] = gateway_jobs = _v10_gateway_jobs(metadata)   # m010


@migration
def m010_gateway_jobs(conn: Connection) -> None:
    """The gateway's async jobs (`Prefer: respond-async`): kept in the ledger so that they survive a worker's
    restart and are run by whichever worker is free."""
    _v10_gateway_jobs(MetaData()).create(conn)
