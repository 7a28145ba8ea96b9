"""`imagebroker route`: the plan for a request, with reasons for every rejection. No network call."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from ..types import ImageRequest, Plan
from .common import (
    AdapterOpt,
    JsonOpt,
    ModelOpt,
    NOpt,
    PolicyOpt,
    SeedOpt,
    SizeOpt,
    TagOpt,
    console,
    handle_errors,
    print_json,
    request_fields,
    usd,
)


def plan_json(plan: Plan) -> dict:
    return {
        "policy": plan.policy, "rule": plan.rule, "objective": plan.objective,
        "candidates": [{"offering": c.offering, "estimated_cost_usd": c.estimated_cost.usd,
                        "bound_usd": c.bound_usd, "cost_status": c.estimated_cost.status,
                        "estimated_latency_s": c.estimated_latency_s, "dropped": list(c.dropped)}
                       for c in plan.candidates],
        "rejected": [{"offering": r.offering, "reasons": list(r.reasons)} for r in plan.rejected],
    }


def print_plan(plan: Plan, *, limit: int | None = None) -> None:
    rule = f", rule {plan.rule!r}" if plan.rule else ""
    console.print(f"policy [bold]{plan.policy}[/bold] (objective {plan.objective}{rule})")
    table = Table(title="candidates, in the order they will be tried", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("#", "offering", "est. cost", "up to", "est. latency", "dropped"):
        table.add_column(col)
    for i, c in enumerate(plan.candidates, 1):
        table.add_row(str(i), c.offering, usd(c.estimated_cost.usd), usd(c.bound_usd),
                      f"{c.estimated_latency_s:g} s" if c.estimated_latency_s is not None else "?",
                      ", ".join(c.dropped) or "-")
    if plan.candidates:
        console.print(table)
    else:
        console.print("[red]no offering can serve this request[/red]")
    rejected = plan.rejected[:limit] if limit else plan.rejected
    if rejected:
        rt = Table(title=f"rejected ({len(plan.rejected)})", title_justify="left", box=box.SIMPLE_HEAD)
        rt.add_column("offering")
        rt.add_column("why")
        for r in rejected:
            rt.add_row(r.offering, "; ".join(r.reasons))
        console.print(rt)


@handle_errors
def route(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    size: SizeOpt = None, n: NOpt = 1, seed: SeedOpt = None, adapter: AdapterOpt = None,
    model: ModelOpt = None, tag: TagOpt = None, policy: PolicyOpt = None, json_out: JsonOpt = False,
) -> None:
    """Show which offerings would serve PROMPT, in order, and why the others would not."""
    from ..broker.core import AsyncBroker
    from ..broker.ledger.store import Ledger

    request = ImageRequest(prompt=prompt, **request_fields(size, n, seed, adapter, model, tag))
    broker = AsyncBroker(policy, ledger=Ledger())
    plan = broker.plan(request)
    if json_out:
        print_json(plan_json(plan))
    else:
        print_plan(plan)
