"""The `imagebroker` command line: one module per command group."""

from __future__ import annotations

import atexit
import itertools
import os
import sys
from typing import Annotated

import typer

from ..logs import enable_cli_logging
from .analysis import breakeven, report, whatif
from .comfyui import app as comfyui_app
from .costs import costs, ledger_app
from .edit import edit
from .generate import generate
from .keys import app as keys_app
from .local import app as local_app
from .output import err_console, print_json, unlimited_when_piped
from .policy import app as policy_app
from .providers import providers
from .route import route
from .serve import serve
from .store import app as store_app

app = typer.Typer(
    name="imagebroker", no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
    help="Route image generation by a build-versus-buy policy, fall back on failure, and record what "
         "every call cost.",
)
VERBOSE = {"-v": 1, "--verbose": 1, "-vv": 2, "-vvv": 2}


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"imagebroker {__version__}")
        raise typer.Exit()


@app.callback()
def _options(verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True, help="Log to stderr: -v each retry, skip and fallback (INFO); -vv every "
                                           "attempt, settlement and ledger write too (DEBUG). Works after any "
                                           "command as well.")] = 0,
        version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")] = False) -> None:
    unlimited_when_piped()
    enable_cli_logging(verbose)


app.command()(generate)
app.command()(edit)
app.command()(route)
app.command()(providers)
app.command()(costs)
app.command()(whatif)
app.command()(breakeven)
app.command()(report)
app.command()(serve)
app.add_typer(policy_app, name="policy")
app.add_typer(keys_app, name="keys")
app.add_typer(local_app, name="local")
app.add_typer(ledger_app, name="ledger")
app.add_typer(store_app, name="store")
app.add_typer(comfyui_app, name="comfyui")


def hoist_verbosity(argv: list[str]) -> list[str]:
    """`-v`/`-vv`/`--verbose` anywhere before a `--` move to the front, where the app reads them, so that
    `imagebroker generate "x" -v` works like `imagebroker -v generate "x"`."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in VERBOSE]
    level = min(2, sum(VERBOSE[a] for a in flags))
    rest = [a for a in argv[:end] if a not in VERBOSE] + argv[end:]
    return ([f"-{'v' * level}"] if level else []) + rest


def _run(argv: list[str]) -> int:
    """The command's exit code. A mistake in the command line itself (an unknown option, a value of the
    wrong type) is Click's usage message, exit 2; with --json or --format json, a JSON error instead."""
    try:
        code = app(args=hoist_verbosity(argv), standalone_mode=False)
    except Exception as exc:
        # Click's exceptions (Typer vendors its own Click, so matched by what they can do, not by class)
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if show is None or not isinstance(exit_code, int):
            raise
        wants_json = "--json" in argv or "--format=json" in argv or any(
            a == "--format" and b == "json" for a, b in itertools.pairwise(argv))
        if wants_json and hasattr(exc, "format_message"):
            print_json({"error": {"type": "UsageError", "message": exc.format_message()}})
        else:
            show()
        return exit_code
    except KeyboardInterrupt:   # Ctrl-C outside a command (while Click parses)
        err_console.print("interrupted", markup=False)
        return 130
    return code if isinstance(code, int) else 0


def main() -> None:
    code = _run(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    if "torch" in sys.modules:
        # Everything is written and closed by now. Tearing down torch and Diffusers' modules at
        # interpreter exit takes 1-3 s more (measured, after every atexit handler has run), which a
        # command line, Ctrl-C included, should not make people wait for: run the handlers, then leave.
        atexit._run_exitfuncs()
        os._exit(code)
    sys.exit(code)
