"""What every command shares: request options, policy loading, error handling and JSON output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from ..errors import ImageBrokerError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])

PolicyOpt = Annotated[str | None, typer.Option("--policy", "-p", help="Policy file or preset name "
                                                "(default: $IMAGEBROKER_POLICY, ./imagebroker.yaml, "
                                                "then the built-in default).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
SizeOpt = Annotated[str | None, typer.Option("--size", help="WIDTHxHEIGHT, e.g. 1024x1024.")]
NOpt = Annotated[int, typer.Option("-n", "--n", help="Number of images.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed (image i gets seed + i).")]
AdapterOpt = Annotated[list[str] | None, typer.Option("--adapter", help="LoRA as REF or REF:SCALE; "
                                                       "repeat for several.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Pin an offering id or alias.")]
TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="key=value, repeatable.")]


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """User mistakes and provider failures become a message and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImageBrokerError as exc:
            err_console.print(f"[red]error:[/red] {type(exc).__name__}: ", markup=True, end="")
            err_console.print(str(exc), markup=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def parse_tags(tags: list[str] | None) -> dict[str, str]:
    out = {}
    for tag in tags or []:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            fail(f"--tag {tag!r} is not key=value")
        out[key] = value
    return out


def request_fields(size: str | None, n: int, seed: int | None, adapter: list[str] | None,
                   model: str | None, tag: list[str] | None) -> dict[str, Any]:
    from ..types import Adapter

    fields: dict[str, Any] = {"n": n, "tags": parse_tags(tag)}
    if size:
        fields["size"] = size
    if seed is not None:
        fields["seed"] = seed
    if adapter:
        fields["adapters"] = tuple(Adapter.parse(a) for a in adapter)
    if model:
        fields["model"] = model
    return fields


def _default(o: Any) -> Any:
    if isinstance(o, Decimal):
        return str(o)
    if hasattr(o, "isoformat"):
        return o.isoformat()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")


def usd(value: Decimal | None, places: int = 6) -> str:
    return "unpriced" if value is None else f"${value:.{places}f}"
