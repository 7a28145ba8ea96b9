"""`imagebroker costs` and `imagebroker ledger path|export`."""

from __future__ import annotations

import csv
import io
import sys
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from .common import console, fail, handle_errors, print_json, usd

ledger_app = typer.Typer(help="Where the ledger is, and its rows.", no_args_is_help=True)
LedgerOpt = Annotated[str | None, typer.Option("--ledger", help="Ledger URL (default: "
                                                "$IMAGEBROKER_LEDGER_URL or the user data dir).")]


@handle_errors
def costs(
    since: Annotated[str | None, typer.Option(help="7d, 12h, 30m or a date (2026-11-01).")] = None,
    until: Annotated[str | None, typer.Option(help="A date or time; the end is exclusive.")] = None,
    by: Annotated[str, typer.Option(help="provider, offering, day, rule, policy, status or tag:KEY.")]
    = "provider",
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    ledger: LedgerOpt = None,
) -> None:
    """Where the money went: calls, images, failures and cost per group, with a total.

    Costs are exact; p50/p95 latencies are within 0.5% (1%-wide histogram buckets)."""
    from ..broker.ledger.store import Ledger
    from ..broker.report import cost_report, parse_when

    if fmt not in ("table", "csv", "json"):
        fail(f"--format {fmt!r}: use table, csv or json")
    groups, total = cost_report(Ledger(ledger), since=parse_when(since), until=parse_when(until, end=True),
                                by=by)
    if fmt == "json":
        print_json({"groups": [g.as_dict() for g in groups], "total": total.as_dict()})
        return
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(total.as_dict()))
        writer.writeheader()
        for g in [*groups, total]:
            writer.writerow(g.as_dict())
        sys.stdout.write(out.getvalue())
        return
    table = Table(title=f"costs by {by}", title_justify="left", box=box.SIMPLE_HEAD)
    columns = [by, "calls", "images", "failed", "adapter errors", "cost", "$/image", "unpriced", "p50", "p95"]
    if not total.unpriced:
        columns.remove("unpriced")  # the note below the table speaks when some are
    if not total.adapter_errors:
        columns.remove("adapter errors")
    width = max(len(g.key) for g in [*groups, total])
    for col in columns:
        table.add_column(col, justify="left" if col == by else "right", no_wrap=True,
                         min_width=width if col == by else None)
    for g in [*groups, total]:
        cells = {by: g.key, "calls": str(g.calls), "images": str(g.images), "failed": str(g.failures),
                 "cost": usd(g.cost_usd), "$/image": usd(g.avg_cost_per_image_usd) if g.images else "-",
                 "unpriced": str(g.unpriced), "adapter errors": str(g.adapter_errors),
                 "p50": f"{g.latency_p50_s:.2f}s" if g.latency_p50_s is not None else "-",
                 "p95": f"{g.latency_p95_s:.2f}s" if g.latency_p95_s is not None else "-"}
        row = [cells[col] for col in columns]
        table.add_row(*row, style="bold" if g is total else None)
    console.print(table)
    if total.unpriced:
        console.print(f"[yellow]{total.unpriced} call(s) have no price: their cost is unknown, "
                      "not zero[/yellow]")
    if total.over_bound:
        console.print(f"[yellow]{total.over_bound} call(s) settled above the most they were expected to "
                      "cost (the bound their budget reserved)[/yellow]")
    if total.adapter_errors:
        console.print(f"[yellow]{total.adapter_errors} attempt(s) failed on a bug in a provider adapter, "
                      "not on the provider (the calls fell back; see the log at ERROR)[/yellow]")


@ledger_app.command("path")
@handle_errors
def path(ledger: LedgerOpt = None) -> None:
    """Print where the ledger lives."""
    from ..broker.ledger.store import Ledger

    console.print(Ledger(ledger).path)


@ledger_app.command("export")
@handle_errors
def export(fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
           ledger: LedgerOpt = None) -> None:
    """Every call row, oldest first (costs as decimal strings)."""
    from sqlalchemy import select

    from ..broker.ledger.schema import calls, from_nusd
    from ..broker.ledger.store import Ledger

    if fmt not in ("csv", "json"):
        fail(f"--format {fmt!r}: use csv or json")
    led = Ledger(ledger)
    with led.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(calls).order_by(calls.c.created_at))]
    for r in rows:
        r["estimated_usd"] = from_nusd(r.pop("estimated_nusd"))
        r["cost_usd"] = from_nusd(r.pop("cost_nusd"))
    if fmt == "json":
        print_json(rows)
        return
    if rows:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (str(v) if v is not None else "") for k, v in r.items()} for r in rows)


@ledger_app.command("rebuild-rollups")
@handle_errors
def rebuild_rollups(ledger: LedgerOpt = None) -> None:
    """Recompute the per-day sums `costs` reads, from the call rows (after editing rows by hand)."""
    from ..broker.ledger.store import Ledger

    Ledger(ledger).rebuild_rollups()
    console.print("rollups rebuilt from the call rows")
