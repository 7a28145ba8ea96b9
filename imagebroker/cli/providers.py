"""`imagebroker providers`: the catalog, with prices, licenses, regions, availability and stale prices."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.table import Table

from ..providers.catalog import stale
from ..providers.offering import Offering
from .common import JsonOpt, PolicyOpt, console, handle_errors, print_json


def price_summary(o: Offering) -> str:
    p = o.price
    if p is None:
        return "unpriced"
    unit = p.unit
    if unit == "per_image":
        return f"${p.usd}/image"
    if unit == "per_megapixel":
        first = f"${p.first_mp_usd} first MP + " if p.first_mp_usd is not None else ""
        return f"{first}${p.usd_per_mp}/MP" + (", each image rounded up" if p.rounding == "ceil" else "")
    if unit == "per_token":
        return f"${p.image_output * 1_000_000:g}/M image tokens"
    if unit == "per_second":
        return f"${p.usd_per_second}/s ({p.hardware})"
    if unit == "per_credit":
        return f"{p.credits} credits (${p.credits * p.usd_per_credit}/image)"
    rate = p.usd_per_gpu_hour
    return f"${rate}/GPU-h" if rate is not None else "GPU-s (rate not set)"


def offering_json(o: Offering, available: str | None, today: Any) -> dict[str, Any]:
    return {
        "id": o.id, "provider": o.provider, "model": o.model, "kind": o.kind, "status": o.status,
        "shutdown": o.shutdown, "regions": list(o.regions),
        "license": {"commercial_use": o.license.commercial_use, "name": o.license.name},
        "price": o.price.model_dump(mode="json") if o.price else None,
        "capabilities": o.capabilities.model_dump(mode="json"),
        "available": available is None, "unavailable_reason": available,
        "stale_price": stale(o, today), "source": o.source, "checked": o.checked,
    }


@handle_errors
def providers(policy: PolicyOpt = None, json_out: JsonOpt = False) -> None:
    """List every offering in the catalog (as the policy sees it) and whether it can be used now."""
    from ..broker.core import AsyncBroker
    from ..broker.ledger.store import Ledger

    broker = AsyncBroker(policy, ledger=Ledger())
    today = datetime.now(UTC).date()
    state = broker.state(today)
    rows = []
    for o in sorted(broker.catalog, key=lambda x: x.id):
        why = ("retired" if o.retired(today) else
               state.unavailable.get(o.id) or state.unavailable.get(o.provider))
        rows.append((o, why))
    if json_out:
        print_json([offering_json(o, why, today) for o, why in rows])
        return
    table = Table(title=f"catalog {broker.catalog.version}", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("offering", "kind", "price", "license", "regions", "available"):
        table.add_column(col, no_wrap=col in ("offering", "kind", "regions"), overflow="fold")
    for o, why in rows:
        price = price_summary(o) + (" [yellow](stale)[/yellow]" if stale(o, today) else "")
        lic = {"yes": "commercial", "no": "[red]non-commercial[/red]",
               "conditional": "[yellow]conditional[/yellow]"}[o.license.commercial_use]
        table.add_row(o.id, o.kind, price, lic, ",".join(o.regions),
                      "[green]yes[/green]" if why is None else f"[dim]{why}[/dim]")
    console.print(table)
    n_stale = sum(stale(o, today) for o, _ in rows)
    if n_stale:
        console.print(f"[yellow]{n_stale} price(s) were checked over 90 days ago (stale)[/yellow]")
