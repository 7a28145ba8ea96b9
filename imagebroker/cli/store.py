"""`imagebroker store path|get|gc`: the image store (`broker/images.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .common import PolicyOpt, fail, handle_errors
from .output import console

if TYPE_CHECKING:
    from ..broker.images import ImageStore

app = typer.Typer(help="The image store: every image generated, by its SHA-256.", no_args_is_help=True)


def _store(policy: str | None) -> ImageStore:
    from ..broker.images import ImageStore
    from ..policies.loader import load_policy

    return ImageStore(load_policy(policy).store.url)


@app.command("path")
@handle_errors
def path(policy: PolicyOpt = None) -> None:
    """Print where the store is (a folder, or an fsspec URL)."""
    console.print(_store(policy).shown_url, markup=False)


@app.command("get")
@handle_errors
def get(sha256: Annotated[str, typer.Argument(help="The image's SHA-256 (as the ledger and sidecar have it).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="File to write.")],
        policy: PolicyOpt = None) -> None:
    """Write one stored image, byte for byte, to --out."""
    data = _store(policy).get(sha256.lower())
    if data is None:
        fail(f"no image {sha256} in the store")
    if out.exists():
        fail(f"--out {out}: already exists")
    try:
        out.write_bytes(data)
    except OSError as exc:
        fail(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__})")
    console.print(f"wrote {out} ({len(data)} bytes)", markup=False)


@app.command("gc")
@handle_errors
def gc(keep_days: Annotated[float | None, typer.Option(help="Keep what was stored in the last N days "
                                                       "(default: the policy's store.keep_days).")] = None,
       policy: PolicyOpt = None) -> None:
    """Remove images stored longer ago than the retention."""
    from ..policies.loader import load_policy

    days = keep_days if keep_days is not None else load_policy(policy).store.keep_days
    if not days > 0:
        fail(f"--keep-days {days:g}: must be a positive number of days")
    removed = _store(policy).gc(days)
    console.print(f"removed {len(removed)} image(s) stored more than {days:g} days ago", markup=False)
