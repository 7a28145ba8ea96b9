"""`imagebroker providers`: the catalog, with prices, licenses, regions, availability and stale prices."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..providers.catalog import stale
from ..providers.offering import Offering
from .common import JsonOpt, LedgerOpt, PolicyOpt, WideOpt, handle_errors, read_only_broker
from .output import Col, console, print_json, print_table, styled


def price_summary(o: Offering) -> str:
    p = o.price
    if p is None:
        return "unpriced"
    unit = p.unit
    if unit == "per_image":
        return f"${p.usd}/image"
    if unit == "per_megapixel":
        first = f"${p.first_mp_usd} first MP + " if p.first_mp_usd is not None else ""
        inputs = "" if not p.input_usd_per_mp else ", input MP too" if p.input_usd_per_mp == p.usd_per_mp else (
            f", input ${p.input_usd_per_mp}/MP")
        return f"{first}${p.usd_per_mp}/MP" + (", each image rounded up" if p.rounding == "ceil" else "") + inputs
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
        "shutdown_warning": o.shutdown_warning(today),
    }


def edit_summary(o: Offering) -> str:
    """What it does with input images: `16 images, mask`, `1 image, strength`, `inpaint only`, or `-`."""
    e, caps = o.capabilities.edit, o.capabilities
    if e is None:
        return "-"
    what = [f"{e.max_images} image{'s' if e.max_images > 1 else ''}"] + [
        name for name, has in (("mask", e.mask), ("strength", e.strength)) if has]
    only = "inpaint only" if e.mask_required else "edit only"
    return ", ".join(what) + ("" if caps.text_to_image else f" ({only})")


LICENSE = {"yes": ("commercial", None), "no": ("non-commercial", "red"), "conditional": ("conditional", "yellow")}
COLUMNS = (Col("offering"), Col("price", wrap=True), Col("available"), Col("license", hide=1),
           Col("edits", hide=4), Col("kind", hide=3), Col("regions", hide=2))


@handle_errors
def providers(policy: PolicyOpt = None, ledger: LedgerOpt = None, wide: WideOpt = False,
              json_out: JsonOpt = False) -> None:
    """List every offering in the catalog (as the policy sees it) and whether it can be used now."""
    broker = read_only_broker(policy, ledger)
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
    full = wide or not console.is_terminal   # on a terminal, "no" fits a column; the reason does not
    cells = []
    for o, why in rows:
        price = styled(price_summary(o))
        if stale(o, today):
            price.append(" (stale)", style="yellow")
        if o.shutdown_warning(today):
            price.append(f" (shuts down {o.shutdown})", style="yellow")
        available = styled("yes", "green") if why is None else styled(why if full else "no", "dim")
        cells.append([o.id, price, available, styled(*LICENSE[o.license.commercial_use]), edit_summary(o),
                      o.kind, ",".join(o.regions)])
    print_table(f"catalog {broker.catalog.version}", COLUMNS, cells, wide=wide)
    unavailable = sum(why is not None for _, why in rows)
    if unavailable and not full:
        console.print(styled(f"{unavailable} offering(s) unavailable: --wide (or --json) says why and what to "
                             "do", "dim"))
    n_stale = sum(stale(o, today) for o, _ in rows)
    if n_stale:
        console.print(styled(f"{n_stale} price(s) were checked over 90 days ago (stale)", "yellow"))
