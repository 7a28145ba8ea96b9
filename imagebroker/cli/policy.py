"""`imagebroker policy check FILE` and `imagebroker policy presets`."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import handle_errors
from .output import console

app = typer.Typer(help="Validate policies and list the built-in presets.", no_args_is_help=True)


@app.command("check")
@handle_errors
def check(file: Annotated[str, typer.Argument(help="Policy file (or preset name).")]) -> None:
    """Validate a policy: exit 0 when it is valid, 2 with a `file:line: field: problem` line for each
    problem when not (names that match no offering, provider or region included)."""
    from ..policies.check import check_names
    from ..policies.effective import effective_catalog
    from ..policies.loader import load_policy
    from ..providers.catalog import builtin_catalog
    from ..providers.registry import provider_names

    policy = load_policy(file)
    catalog = effective_catalog(policy, builtin_catalog())
    check_names(policy, catalog, provider_names())
    console.print(f"ok: policy {policy.name!r} ({len(policy.rules)} rules, {len(policy.budgets)} "
                  f"budgets, objective {policy.objective}; {len(catalog)} offerings)")


@app.command("presets")
def presets() -> None:
    """List the built-in presets."""
    from ..policies.loader import load_policy, preset_names

    for name in preset_names():
        console.print(f"[bold]{name}[/bold]: {load_policy(name).description.strip()}")
