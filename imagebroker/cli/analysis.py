"""`imagebroker whatif`, `breakeven` and `report`: build versus buy, answered from the ledger."""

from __future__ import annotations

import statistics
import time
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import JsonOpt, LedgerOpt, PolicyOpt, WideOpt, fail, handle_errors
from .output import Col, console, print_json, print_table, styled, usd

if TYPE_CHECKING:
    from ..broker.ledger.store import Ledger

SinceOpt = Annotated[str | None, typer.Option(help="7d, 12h, 30m or a date (from its midnight UTC).")]
UntilOpt = Annotated[str | None, typer.Option(help="A date or time, not included.")]
MONTH_S = 30 * 86_400
BENCHMARK_FILE = Path("benchmarks/results/gpu_pipelines.json")   # where benchmarks/gpu_pipelines.py writes


def _decimal(name: str, value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:
        fail(f"{name} {value!r} is not a number")
    if not number.is_finite() or number < 0:
        fail(f"{name} {value!r} must be a finite number >= 0")
    return number


def _ledger(ledger: str | None) -> Ledger:
    from ..broker.ledger.store import Ledger

    return Ledger(ledger, read_only=True)


def _day(name: str, value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        fail(f"{name} {value!r} is not a date (YYYY-MM-DD)")


def _whatif(policy: str, led: Ledger, since: str | None, until: str | None, by: str,
            prices_as_of: date | None = None) -> Any:
    from ..broker.report import parse_when
    from ..broker.whatif import whatif as replay
    from ..policies.effective import effective_catalog
    from ..policies.loader import load_policy
    from ..providers.catalog import builtin_catalog

    target = load_policy(policy)
    return replay(led, target, effective_catalog(target, builtin_catalog()), since=parse_when(since),
                  until=parse_when(until), by=by, prices_as_of=prices_as_of)


@handle_errors
def whatif(
    policy: Annotated[str, typer.Option("--policy", "-p", help="The policy to replay the ledger under.")],
    since: SinceOpt = None, until: UntilOpt = None,
    by: Annotated[str, typer.Option(help="provider, offering, day, policy, status or tag:KEY.")] = "provider",
    prices_as_of: Annotated[str | None, typer.Option(help="Price each offering as the catalog records it on "
                                                     "this day (YYYY-MM-DD), not today.")] = None,
    ledger: LedgerOpt = None, wide: WideOpt = False, json_out: JsonOpt = False,
) -> None:
    """What the recorded calls would have cost under another policy, with today's catalog."""
    result = _whatif(policy, _ledger(ledger), since, until, by, _day("--prices-as-of", prices_as_of))
    if json_out:
        print_json(result.as_dict())
        return
    d = result.as_dict()
    console.print(f"{result.calls} call(s) replayed under policy {result.policy}: actual {usd(result.actual_usd)}, "
                  f"what-if {usd(result.whatif_usd)} (up to {usd(result.whatif_bound_usd)})", markup=False)
    rows = [[g["key"], str(g["calls"]), usd(g["actual_cost_usd"]), usd(g["whatif_cost_usd"]), str(g["unroutable"])]
            for g in d["groups"]]
    print_table(f"by {by}", (Col(by), Col("calls", right=True), Col("actual", right=True),
                             Col("what-if", right=True), Col("no route", right=True, hide=1)), rows, wide=wide)
    if d["moves"]:
        print_table("where the calls would go", (Col("from"), Col("to"), Col("calls", right=True)),
                    [[m["from"], m["to"], str(m["calls"])] for m in d["moves"]], wide=wide)
    if result.unroutable:
        console.print(styled(f"{result.unroutable} call(s) would have no route; most common reasons:", "yellow"))
        for reason, n in d["unroutable_reasons"].items():
            console.print(f"  {n} x {reason}", markup=False)
    if result.local_calls:
        console.print(f"{result.local_calls} call(s) would run locally: about {d['whatif']['local_gpu_seconds']} "
                      "GPU-seconds", markup=False)
    if result.prices_not_recorded:
        missing = ", ".join(f"{o} ({n})" for o, n in result.prices_not_recorded.most_common())
        console.print(styled(f"prices as of {result.prices_as_of}: the catalog records no price that day for "
                             f"{missing}; today's price stood in", "yellow"))
    if result.partial:
        console.print(styled(f"{result.partial} call(s) were recorded before the ledger kept planning fields: "
                             "replayed with their size, n and seed only", "dim"))


def breakeven_from(price_per_image: str | None, offering: str | None, size: str | None, gpu_usd_per_hour: str | None,
                   seconds_per_image: str | None, measured: str | None, utilisation: float,
                   fixed_usd_per_month: str, led: Ledger, benchmark: str | None = None,
                   benchmark_file: Path = BENCHMARK_FILE) -> Any:
    """A BreakEven from the command's options (shared by `breakeven` and `report`)."""
    from ..broker.economics import BreakEven, benchmark_seconds
    from ..broker.ledger.schema import calls
    from ..policies.pricing import estimate
    from ..providers.catalog import builtin_catalog
    from ..types import ImageRequest

    hosted = _decimal("--price-per-image", price_per_image)
    if hosted is None:
        if offering is None:
            fail("give --price-per-image USD or --offering ID (its catalog price)")
        found = builtin_catalog().resolve(offering)
        if found is None:
            fail(f"--offering {offering!r}: not in the catalog (see `imagebroker providers`)")
        cost = estimate(ImageRequest(prompt="x", **({"size": size} if size else {})), found)
        if cost.usd is None:
            fail(f"--offering {offering}: {cost.detail}")
        hosted = cost.usd
    seconds, seconds_from = _decimal("--seconds-per-image", seconds_per_image), ""
    if seconds is None and benchmark is not None:
        seconds, seconds_from = benchmark_seconds(benchmark_file, benchmark)
    from sqlalchemy import func, select

    with led.engine.connect() as conn:
        if seconds is None:
            if measured is None:
                fail("give --seconds-per-image S, --measured OFFERING (its median latency in the ledger) or "
                     "--benchmark sdxl|flux (benchmarks/gpu_pipelines.py's results)")
            latencies = conn.execute(select(calls.c.latency_s, calls.c.images).where(
                calls.c.offering == measured, calls.c.status == "ok", calls.c.cached == 0)).all()
            if not latencies:
                fail(f"--measured {measured}: no successful calls of it in the ledger")
            seconds = Decimal(str(round(statistics.median(lat / max(1, n) for lat, n in latencies), 3)))
            seconds_from = f"the median of {len(latencies)} call(s) of {measured} in the ledger"
        monthly = conn.execute(select(func.coalesce(func.sum(calls.c.images), 0)).where(
            calls.c.status == "ok", calls.c.created_at >= time.time() - MONTH_S)).scalar()
    if gpu_usd_per_hour is None:
        fail("give --gpu-usd-per-hour USD or --gpu NAME (see `imagebroker breakeven --help`)")
    rate = _decimal("--gpu-usd-per-hour", gpu_usd_per_hour) or Decimal(0)
    return BreakEven(hosted_usd_per_image=hosted, gpu_usd_per_hour=rate, seconds_per_image=seconds,
                     utilisation=Decimal(str(utilisation)),
                     fixed_usd_per_month=_decimal("--fixed-usd-per-month", fixed_usd_per_month) or Decimal(0),
                     monthly_images=int(monthly or 0), seconds_from=seconds_from)


@handle_errors
def breakeven(
    gpu_usd_per_hour: Annotated[str | None, typer.Option(help="What an hour of the GPU costs you.")] = None,
    gpu: Annotated[str | None, typer.Option(help="Or a GPU price from the research: h100-runpod, "
                                            "a100-modal, l40s-runpod, rtx4090-runpod, ...")] = None,
    price_per_image: Annotated[str | None, typer.Option(help="The hosted price per image, USD.")] = None,
    offering: Annotated[str | None, typer.Option(help="Or a hosted offering: its catalog price.")] = None,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT for --offering's price.")] = None,
    seconds_per_image: Annotated[str | None, typer.Option(help="GPU-seconds one image takes.")] = None,
    measured: Annotated[str | None, typer.Option(help="Or a local offering: its median in the ledger.")] = None,
    benchmark: Annotated[str | None, typer.Option(help="Or sdxl, flux (compiled) or sdxl:eager, flux:eager from "
                                                  "benchmarks/gpu_pipelines.py's results.")] = None,
    benchmark_file: Annotated[Path, typer.Option(help="That benchmark's results file.")] = BENCHMARK_FILE,
    utilisation: Annotated[float, typer.Option(help="Share of the GPU's hours that make images.")] = 0.6,
    fixed_usd_per_month: Annotated[str, typer.Option(help="Ops, storage, ... per month.")] = "0",
    ledger: LedgerOpt = None, json_out: JsonOpt = False,
) -> None:
    """At what monthly volume a GPU of your own beats a hosted price, with the arithmetic shown."""
    from ..broker.economics import gpu_usd_per_hour as known_rate

    if gpu is not None:
        gpu_usd_per_hour = str(known_rate(gpu))
    result = breakeven_from(price_per_image, offering, size, gpu_usd_per_hour, seconds_per_image, measured,
                            utilisation, fixed_usd_per_month, _ledger(ledger), benchmark, benchmark_file)
    if json_out:
        print_json(result.as_dict())
        return
    for line in result.arithmetic():
        console.print(line, markup=False)


@handle_errors
def report(
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")],
    since: SinceOpt = None, policy: PolicyOpt = None,
    whatif_policy: Annotated[str | None, typer.Option("--whatif", help="Also compare with this policy.")] = None,
    prices_as_of: Annotated[str | None, typer.Option(help="The what-if at the catalog's prices of this day "
                                                     "(YYYY-MM-DD).")] = None,
    gpu_usd_per_hour: Annotated[str | None, typer.Option(help="Draw the break-even curve for this GPU price "
                                                         "(with --price-per-image or --offering, and "
                                                         "--seconds-per-image or --measured).")] = None,
    price_per_image: Annotated[str | None, typer.Option()] = None,
    offering: Annotated[str | None, typer.Option()] = None,
    seconds_per_image: Annotated[str | None, typer.Option()] = None,
    measured: Annotated[str | None, typer.Option()] = None,
    ledger: LedgerOpt = None,
) -> None:
    """One self-contained HTML page of where the money went: charts and their figures, offline."""
    from ..broker.page import render
    from ..broker.report import parse_when
    from ..policies.loader import load_policy

    loaded = load_policy(policy)
    led = _ledger(ledger or loaded.ledger.url)   # one ledger for every section of the page
    day = _day("--prices-as-of", prices_as_of)
    compared = _whatif(whatif_policy, led, since, None, "provider", day) if whatif_policy else None
    line = breakeven_from(price_per_image, offering, None, gpu_usd_per_hour, seconds_per_image, measured, 0.6,
                          "0", led) if gpu_usd_per_hour is not None else None
    page = render(led, loaded, since=parse_when(since), whatif=compared, breakeven=line)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        fail(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__})")
    console.print(f"wrote {out} ({len(page) // 1024} KiB)", markup=False)
