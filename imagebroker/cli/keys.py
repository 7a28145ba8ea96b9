"""`imagebroker keys`: the team gateway's keys, kept (as hashes) in the ledger the gateway uses."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import JsonOpt, LedgerOpt, TagOpt, handle_errors, parse_tags
from .output import Col, console, print_json, print_table

app = typer.Typer(help="The team gateway's keys (`imagebroker serve`): made, listed, revoked.", no_args_is_help=True)


def _store(ledger: str | None):
    from ..broker.ledger.store import Ledger
    from ..gateway.keys import KeyStore

    return KeyStore(Ledger(ledger))


@app.command("create")
@handle_errors
def create(name: Annotated[str, typer.Argument(help="The key's name (a team, an app).")],
           tag: TagOpt = None,
           budget: Annotated[str | None, typer.Option(help="USD/PERIOD (day, week, month, total), e.g. 25/month: "
                                                           "its calls are refused once it is spent.")] = None,
           admin: Annotated[bool, typer.Option("--admin", help="May read every team's costs.")] = False,
           allow: Annotated[list[str] | None, typer.Option("--allow", help="An offering (or glob) it may use; "
                                                                           "repeatable (default: any).")] = None,
           webhook: Annotated[str | None, typer.Option(help="A URL its finished async jobs are POSTed to, signed "
                                                            "with a secret printed now.")] = None,
           json_out: JsonOpt = False, ledger: LedgerOpt = None) -> None:
    """Make a key and print it, this once: only its SHA-256 is kept."""
    key, record = _store(ledger).create(name, tags=parse_tags(tag), budget=budget, admin=admin,
                                        allow=tuple(allow or ()), webhook=webhook)
    if json_out:
        print_json({"key": key, **record.as_json(), "webhook_secret": record.webhook_secret})
        return
    console.print(f"key {record.name}: {key}", markup=False, soft_wrap=True)
    if record.webhook_secret:
        console.print(f"webhook secret (verifies X-Imagebroker-Signature): {record.webhook_secret}", markup=False,
                      soft_wrap=True)
    console.print("it is shown this once; only its hash is kept in the ledger", markup=False)


@app.command("list")
@handle_errors
def list_keys(json_out: JsonOpt = False, ledger: LedgerOpt = None) -> None:
    """Every key: its name, the start of the key, tags, budget, and whether it is revoked."""
    keys = _store(ledger).all()
    if json_out:
        print_json([k.as_json() for k in keys])
        return
    rows = [[k.name, k.prefix + "...", ", ".join(f"{a}={b}" for a, b in k.tags.items()) or "-",
             f"${k.budget_usd}/{k.budget_period}" if k.budget_usd is not None else "-",
             "admin" if k.admin else "-", ", ".join(k.allow) or "any",
             "revoked" if k.revoked_at else "active"] for k in keys]
    print_table("gateway keys", (Col("name"), Col("key"), Col("tags"), Col("budget"), Col("admin"),
                                 Col("offerings"), Col("state")), rows)


@app.command("revoke")
@handle_errors
def revoke(name: Annotated[str, typer.Argument(help="The key's name.")], ledger: LedgerOpt = None) -> None:
    """Revoke a key: gateways refuse it within seconds (they remember a key found for 5 s)."""
    record = _store(ledger).revoke(name)
    console.print(f"key {record.name} revoked", markup=False)
