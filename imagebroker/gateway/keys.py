"""Gateway keys, kept in the ledger: a name, the SHA-256 of the key (the key is shown once, when it is made,
and never stored), the tags every call made with it carries (so `costs --by tag:team` works), an optional
budget of its own, enforced as a policy budget is (reserved in the ledger before each call, so it holds
across workers and hosts), an admin flag, and an optional allow-list of offerings."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update

from ..broker.ledger.schema import from_nusd, gateway_keys, to_nusd
from ..broker.ledger.store import Ledger
from ..errors import ConfigError
from ..policies.schema import Budget, BudgetScope

if TYPE_CHECKING:
    from starlette.responses import Response

    from ..broker.core import AsyncBroker

PREFIX = "ibk-"
PERIODS = ("day", "week", "month", "total")
KEY_TAG = "gateway_key"   # the tag naming the key a call was made with
KEY_ENV = "IMAGEBROKER_GATEWAY_KEY"   # one more key, an admin one
KEY_TTL_S = 5.0   # how long a key found stays found (a revocation, or the first key made, takes this long at most)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class GatewayKey:
    name: str
    prefix: str
    tags: dict[str, str] = field(default_factory=dict)
    budget_usd: Decimal | None = None
    budget_period: str | None = None
    admin: bool = False
    allow: tuple[str, ...] = ()
    created_at: float = 0.0
    revoked_at: float | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)

    def allows(self, offering: str) -> bool:
        return not self.allow or any(fnmatch.fnmatchcase(offering, p) for p in self.allow)

    def budget(self) -> Budget | None:
        """Its budget as a policy budget over the calls tagged with its name."""
        if self.budget_usd is None or self.budget_period is None:
            return None
        return Budget(name=f"key:{self.name}", period=self.budget_period, limit_usd=self.budget_usd,  # type: ignore[arg-type]
                      scope=BudgetScope(tags={KEY_TAG: self.name}), on_exceed="reject")

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "prefix": self.prefix, "tags": self.tags,
                "budget": None if self.budget_usd is None else f"{self.budget_usd}/{self.budget_period}",
                "admin": self.admin, "allow": list(self.allow), "created_at": self.created_at,
                "revoked": self.revoked_at is not None, "webhook_url": self.webhook_url}


def parse_budget(text: str) -> tuple[Decimal, str]:
    """`25/month` as (Decimal("25"), "month")."""
    amount, _, period = text.partition("/")
    try:
        usd = Decimal(amount.strip().lstrip("$"))
    except InvalidOperation:
        raise ConfigError(f"--budget {text!r}: give USD/PERIOD, e.g. 25/month") from None
    if not usd.is_finite() or usd < 0 or period not in PERIODS:
        raise ConfigError(f"--budget {text!r}: give USD/PERIOD with a non-negative amount and a period of "
                          f"{', '.join(PERIODS)}")
    return usd, period


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The keys in one ledger (SQLite or PostgreSQL)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def create(self, name: str, *, tags: dict[str, str] | None = None, budget: str | None = None,
               admin: bool = False, allow: tuple[str, ...] = (), webhook: str | None = None) -> tuple[str, GatewayKey]:
        """A new key: (the key, shown this once; its record, whose `webhook_secret` is shown this once too)."""
        if not _NAME.match(name):
            raise ConfigError(f"key name {name!r}: letters, digits, '.', '_' and '-', at most 100 characters")
        if KEY_TAG in (tags or {}):
            raise ConfigError(f"--tag {KEY_TAG}=...: that tag is the key's own name")
        usd, period = parse_budget(budget) if budget else (None, None)
        if webhook is not None and not webhook.startswith(("https://", "http://")):
            raise ConfigError(f"--webhook {webhook!r}: an http(s) URL")
        key = PREFIX + secrets.token_urlsafe(32)
        record = GatewayKey(name, key[:12], dict(tags or {}), usd, period, admin, tuple(allow), time.time(),
                            webhook_url=webhook, webhook_secret=secrets.token_hex(32) if webhook else None)
        with self.ledger.engine.begin() as conn:
            if conn.execute(select(gateway_keys.c.name).where(gateway_keys.c.name == name)).first():
                raise ConfigError(f"a key named {name!r} exists: revoke it first, or choose another name")
            conn.execute(insert(gateway_keys).values(
                name=name, key_sha256=digest(key), prefix=record.prefix, tags_json=json.dumps(record.tags),
                budget_nusd=to_nusd(usd), budget_period=period, admin=int(admin),
                allow_json=json.dumps(list(allow)) if allow else None, created_at=record.created_at,
                webhook_url=webhook, webhook_secret=record.webhook_secret))
        return key, record

    def revoke(self, name: str) -> GatewayKey:
        with self.ledger.engine.begin() as conn:
            done = conn.execute(update(gateway_keys).where(gateway_keys.c.name == name,
                                                           gateway_keys.c.revoked_at.is_(None))
                                .values(revoked_at=time.time()))
        if not done.rowcount:
            raise ConfigError(f"no active key named {name!r} (`imagebroker keys list` shows them)")
        return next(k for k in self.all() if k.name == name)

    def all(self) -> list[GatewayKey]:
        with self.ledger.engine.connect() as conn:
            rows = conn.execute(select(gateway_keys).order_by(gateway_keys.c.created_at)).mappings().all()
        return [_record(r) for r in rows]

    def any(self) -> bool:
        """Whether a key was ever made (with none, the gateway is open; revoking every key does not open it)."""
        with self.ledger.engine.connect() as conn:
            return conn.execute(select(gateway_keys.c.name).limit(1)).first() is not None

    def named(self, name: str) -> GatewayKey | None:
        """The active key of this name (a job's worker reads its budget by it), or None."""
        return self._active(gateway_keys.c.name == name)

    def find(self, key: str) -> GatewayKey | None:
        """The active key this is, or None."""
        return self._active(gateway_keys.c.key_sha256 == digest(key))

    def _active(self, match: Any) -> GatewayKey | None:
        with self.ledger.engine.connect() as conn:
            active = select(gateway_keys).where(match, gateway_keys.c.revoked_at.is_(None))
            row = conn.execute(active).mappings().first()
        return None if row is None else _record(row)


def _record(row: Any) -> GatewayKey:
    return GatewayKey(row["name"], row["prefix"], json.loads(row["tags_json"]), from_nusd(row["budget_nusd"]),
                      row["budget_period"], bool(row["admin"]),
                      tuple(json.loads(row["allow_json"])) if row["allow_json"] else (), row["created_at"],
                      row["revoked_at"], row["webhook_url"], row["webhook_secret"])


def for_key(broker: AsyncBroker, key: GatewayKey | None, fields: dict[str, Any]) -> Response | None:
    """The call as the key makes it: its tags (and its name) on the call; with an allow-list, the offering asked
    must be on it, and with `auto` the first planned offering on it is asked for (fallback within the
    allow-list is not done yet). None: go on; else the 403."""
    if key is None:
        return None
    fields["tags"] = {**fields.get("tags", {}), **key.tags, KEY_TAG: key.name}
    if not key.allow:
        return None
    if "model" in fields:
        offering = broker.catalog.resolve(fields["model"]).id
        if key.allows(offering):
            return None
    else:
        allowed = [c.offering for c in broker.plan(**fields).candidates if key.allows(c.offering)]
        if allowed:
            fields["model"] = allowed[0]
            return None
        offering = "any planned offering"
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": f"key {key.name!r} may not use {offering}", "type":
                                   "invalid_request_error", "param": "model", "code": "model_not_allowed"}},
                        status_code=403)


ENV_KEY = GatewayKey(name="env", prefix="(env)", admin=True)


class Callers:
    """Who a gateway request is, from its Authorization header: the key it carries, None while the gateway is
    open (no key was ever made and IMAGEBROKER_GATEWAY_KEY is unset), or False (refused). A key found is
    remembered for KEY_TTL_S, so a revocation takes effect within that; while none was made the ledger is
    asked at most every KEY_TTL_S whether one has been (the first closes the gateway within that), and never
    again once one was (keys are never deleted). A key the ledger does not know is remembered too, for as
    long: an open gateway's clients all send some key (the OpenAI SDK needs one), and a new key is random,
    so it was never asked before it was made."""

    def __init__(self, broker: Callable[[], AsyncBroker]) -> None:
        self.broker = broker
        self.found: dict[str, tuple[GatewayKey, float]] = {}   # key digest -> (key, when found)
        self.none_made_at = -math.inf   # when the ledger last said no key was ever made (monotonic)
        self.unknown: dict[str, float] = {}   # key digest -> when the ledger said it has no such key

    async def of(self, authorization: str) -> GatewayKey | bool | None:
        given = authorization.removeprefix("Bearer ").strip()
        env_key = os.environ.get(KEY_ENV)
        if env_key and given and hmac.compare_digest(given.encode(), env_key.encode()):
            return ENV_KEY
        hashed, now = digest(given), time.monotonic()
        if given and (hit := self.found.get(hashed)) and now - hit[1] < KEY_TTL_S:
            return hit[0]
        store = KeyStore(self.broker().ledger)
        ask = bool(given) and now - self.unknown.get(hashed, -math.inf) >= KEY_TTL_S
        key = await asyncio.to_thread(store.find, given) if ask else None
        if key is not None:
            self.found[hashed] = (key, now)
            if (budget := key.budget()) is not None:
                self.broker().add_budgets([budget])
            return key
        if ask:
            if len(self.unknown) > 10_000:   # random keys thrown at it: forget them rather than grow
                self.unknown.clear()
            self.unknown[hashed] = now
        if not env_key and not await self._made(store):
            return None
        return False

    async def _made(self, store: KeyStore) -> bool:
        if self.none_made_at == math.inf:
            return True
        if time.monotonic() - self.none_made_at < KEY_TTL_S:
            return False
        made = await asyncio.to_thread(store.any)
        self.none_made_at = math.inf if made else time.monotonic()
        return made
