"""The `imagebroker` command line: one module per command group."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..logs import enable_cli_logging
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
VERBOSE = {"-v": 1, "--verbose": 1, "-vv": 2, "-vvv": 2}


@app.callback()
def _options(verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True, help="Log to stderr: -v each retry, skip and fallback (INFO); -vv every "
                                           "attempt, settlement and ledger write too (DEBUG). Works after any "
                                           "command as well.")] = 0) -> None:
    enable_cli_logging(verbose)


app.command()(generate)
app.command()(route)
app.command()(providers)
app.command()(costs)
app.add_typer(policy_app, name="policy")
app.add_typer(ledger_app, name="ledger")


def hoist_verbosity(argv: list[str]) -> list[str]:
    """`-v`/`-vv`/`--verbose` anywhere before a `--` move to the front, where the app reads them, so that
    `imagebroker generate "x" -v` works like `imagebroker -v generate "x"`."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in VERBOSE]
    level = min(2, sum(VERBOSE[a] for a in flags))
    rest = [a for a in argv[:end] if a not in VERBOSE] + argv[end:]
    return ([f"-{'v' * level}"] if level else []) + rest


def main() -> None:
    app(args=hoist_verbosity(sys.argv[1:]))
