"""The `imagebroker` command line: one module per command group."""

from __future__ import annotations

import typer

from .costs import costs, ledger_app
from .generate import generate
from .policy import app as policy_app
from .providers import providers
from .route import route

app = typer.Typer(
    name="imagebroker", no_args_is_help=True, add_completion=False,
    help="Route image generation by a build-versus-buy policy, fall back on failure, and record what "
         "every call cost.",
)
app.command()(generate)
app.command()(route)
app.command()(providers)
app.command()(costs)
app.add_typer(policy_app, name="policy")
app.add_typer(ledger_app, name="ledger")


def main() -> None:
    app()
