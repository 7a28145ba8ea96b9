"""`imagebroker costs` and `imagebroker ledger path|export`."""

from __future__ import annotations

import csv
import io
import sys
from decimal import Decimal
from typing import Annotated

import typer

from .common import LedgerOpt, WideOpt, fail, handle_errors
from .output import Col, console, plain_decimal, print_json, print_table, styled, usd

ledger_app = typer.Typer(help="Where the ledger is, and its rows.", no_args_is_help=True)
GROUP_COLUMNS = (Col("calls", right=True), Col("images", right=True, hide=3), Col("failed", right=True),
                 Col("adapter errors", right=True, hide=4), Col("cost", right=True),
                 Col("$/image", right=True, hide=2), Col("unpriced", right=True),
                 Col("p50", right=True, hide=1), Col("p95", right=True, hide=1))


def _csv_cell(value: object) -> str:
    return "" if value is None else plain_decimal(value) if isinstance(value, Decimal) else str(value)


def _write_csv(fieldnames: list[str], rows: list[dict[str, object]]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in r.items()} for r in rows)
    sys.stdout.write(out.getvalue())


def _seconds(value: float | None) -> str:
    return f"{value:.2f}s" if value is not None else "-"


@handle_errors
def costs(
    since: Annotated[str | None, typer.Option(help="7d, 12h, 30m or a date (2026-11-01, from its midnight "
                                                  "UTC).")] = None,
    until: Annotated[str | None, typer.Option(help="A date or time, not included: --until 2026-11-02 ends "
                                                  "at that day's midnight UTC.")] = None,
    by: Annotated[str, typer.Option(help="provider, offering, day, rule, policy, status or tag:KEY.")]
    = "provider",
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    ledger: LedgerOpt = None, wide: WideOpt = False,
) -> None:
    """Where the money went: calls, images, failures and cost per group, with a total.

    Costs are exact; p50/p95 latencies are within 0.5% (1%-wide histogram buckets). A failed call counts
    under the offering it tried last."""
    from ..broker.ledger.store import Ledger
    from ..broker.report import cost_report, parse_when

    if fmt not in ("table", "csv", "json"):
        fail(f"--format {fmt!r}: use table, csv or json")
    groups, total = cost_report(Ledger(ledger, read_only=True), since=parse_when(since),
                                until=parse_when(until), by=by)
    if fmt == "json":
        print_json({"groups": [g.as_dict() for g in groups], "total": total.as_dict()})
        return
    if fmt == "csv":
        _write_csv(list(total.as_dict()), [g.as_dict() for g in [*groups, total]])
        return
    columns = [Col(by), *GROUP_COLUMNS]
    drop = {"unpriced"} if not total.unpriced else set()   # the note below the table speaks when some are
    if not total.adapter_errors:
        drop.add("adapter errors")
    columns = [c for c in columns if c.name not in drop]
    rows = []
    for g in [*groups, total]:
        cells = {by: g.key, "calls": str(g.calls), "images": str(g.images), "failed": str(g.failures),
                 "cost": usd(g.cost_usd), "$/image": usd(g.avg_cost_per_image_usd) if g.images else "-",
                 "unpriced": str(g.unpriced), "adapter errors": str(g.adapter_errors),
                 "p50": _seconds(g.latency_p50_s), "p95": _seconds(g.latency_p95_s)}
        rows.append([cells[c.name] for c in columns])
    print_table(f"costs by {by}", columns, rows, wide=wide, bold_last=True)
    if total.unpriced:
        console.print(styled(f"{total.unpriced} call(s) have no price: their cost is unknown, not zero",
                             "yellow"))
    if total.over_bound:
        console.print(styled(f"{total.over_bound} call(s) settled above the most they were expected to cost "
                             "(the bound their budget reserved)", "yellow"))
    if total.cache_hits:
        console.print(styled(f"{total.cache_hits} call(s) answered from the cache ($0): cache saved "
                             f"{usd(total.saved_usd)}", "green"))
    if total.adapter_errors:
        console.print(styled(f"{total.adapter_errors} attempt(s) failed on a bug in a provider adapter, not on "
                             "the provider (the calls fell back; see the log at ERROR)", "yellow"))


@ledger_app.command("path")
@handle_errors
def path(ledger: LedgerOpt = None) -> None:
    """Print where the ledger lives (its file, or its URL without the password). Opens nothing."""
    from ..broker.ledger.store import ledger_url, shown_url

    console.print(shown_url(ledger_url(ledger)), markup=False)


@ledger_app.command("migrate")
@handle_errors
def migrate(ledger: LedgerOpt = None) -> None:
    """Create the ledger, or bring one written by an older imagebroker up to date."""
    from ..broker.ledger.store import Ledger

    led = Ledger(ledger)
    console.print(f"ledger {led.path} is up to date", markup=False)


@ledger_app.command("export")
@handle_errors
def export(fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
           ledger: LedgerOpt = None) -> None:
    """Every call row, oldest first (costs as decimal strings); CSV has its header even with no rows."""
    from sqlalchemy import select

    from ..broker.ledger.schema import calls, from_nusd
    from ..broker.ledger.store import Ledger

    if fmt not in ("csv", "json"):
        fail(f"--format {fmt!r}: use csv or json")
    led = Ledger(ledger, read_only=True)
    with led.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(calls).order_by(calls.c.created_at))]
    money = [c.name for c in calls.columns if c.name.endswith("_nusd")]   # integer nano-USD -> decimal USD
    for r in rows:
        for name in money:
            r[name.removesuffix("_nusd") + "_usd"] = from_nusd(r.pop(name))
    if fmt == "json":
        print_json(rows)
        return
    fields = [c.name for c in calls.columns if c.name not in money] + [m.removesuffix("_nusd") + "_usd" for m in money]
    _write_csv(fields, rows)


@ledger_app.command("rebuild-rollups")
@handle_errors
def rebuild_rollups(ledger: LedgerOpt = None) -> None:
    """Recompute the per-day sums `costs` reads, from the call rows (after editing rows by hand)."""
    from ..broker.ledger.store import Ledger

    Ledger(ledger).rebuild_rollups()
    console.print("rollups rebuilt from the call rows")
