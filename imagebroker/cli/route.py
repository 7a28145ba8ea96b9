"""`imagebroker route`: the plan for a request, with reasons for every rejection. No network call."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import NoRouteError
from ..types import ImageRequest, Plan
from .common import (
    AdapterOpt,
    AspectOpt,
    ControlOpt,
    ImageOpt,
    ImagePromptOpt,
    JsonOpt,
    LedgerOpt,
    MaskOpt,
    ModelOpt,
    NOpt,
    PolicyOpt,
    ResolutionOpt,
    SeedOpt,
    SizeOpt,
    StrengthOpt,
    TagOpt,
    WideOpt,
    control_fields,
    edit_fields,
    handle_errors,
    read_only_broker,
    request_fields,
    shape_fields,
)
from .output import Col, console, print_json, print_table, styled, usd

CANDIDATE_COLUMNS = (Col("#", right=True), Col("offering"), Col("size", hide=2), Col("est. cost", right=True),
                     Col("up to", right=True, hide=2), Col("est. latency", right=True, hide=1),
                     Col("dropped", wrap=True, hide=3))


def print_plan(plan: Plan, *, wide: bool = False, limit: int | None = None) -> None:
    rule = f", rule {plan.rule!r}" if plan.rule else ""
    console.print(f"policy {plan.policy} (objective {plan.objective}{rule})", markup=False)
    if plan.candidates:
        rows = [[str(i), c.offering, c.size or "-", usd(c.estimated_cost.usd), usd(c.bound_usd),
                 f"{c.estimated_latency_s:g} s" if c.estimated_latency_s is not None else "?",
                 ", ".join(c.dropped) or "-"] for i, c in enumerate(plan.candidates, 1)]
        print_table("candidates, in the order they will be tried", CANDIDATE_COLUMNS, rows, wide=wide)
        for warning in dict.fromkeys(w for c in plan.candidates for w in c.warnings):
            console.print(styled(f"warning: {warning}", "yellow"))
    else:
        console.print(styled("no offering can serve this request", "red"))
    rejected = plan.rejected[:limit] if limit else plan.rejected
    if rejected:
        print_table(f"rejected ({len(plan.rejected)})", (Col("offering"), Col("why", wrap=True)),
                    [[r.offering, "; ".join(r.reasons)] for r in rejected], wide=wide)


@handle_errors
def route(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    size: SizeOpt = None, n: NOpt = 1, seed: SeedOpt = None, adapter: AdapterOpt = None,
    control: ControlOpt = None,
    image_prompt: ImagePromptOpt = None,
    model: ModelOpt = None, tag: TagOpt = None, image: ImageOpt = None, mask: MaskOpt = None,
    strength: StrengthOpt = None, aspect_ratio: AspectOpt = None, resolution: ResolutionOpt = None,
    policy: PolicyOpt = None, ledger: LedgerOpt = None,
    wide: WideOpt = False, json_out: JsonOpt = False,
) -> None:
    """Show which offerings would serve PROMPT (an edit, with --image), in order, and why the others would
    not. Calls no provider; exits 2 when no offering can serve it."""
    fields = (request_fields(size, n, seed, adapter, model, tag) | control_fields(control, image_prompt)
              | edit_fields(image, mask, strength)
              | shape_fields(aspect_ratio, resolution))
    request = ImageRequest(prompt=prompt, **fields)
    plan = read_only_broker(policy, ledger).plan(request)
    if json_out:
        print_json(plan.as_json())
    else:
        print_plan(plan, wide=wide)
    if not plan.candidates:
        raise typer.Exit(NoRouteError.exit_code)
