"""What the broker reads back from the ledger about earlier calls: the call an idempotency key was served
by (for a replay), the call a cache key was first served by, and recent latencies for the planner."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from .schema import calls
from .writer import retried


@dataclass(frozen=True)
class ServedCall:
    """An earlier call that succeeded, as its row has it."""

    request_id: str
    created_at: float
    offering: str
    image_sha256s: list[str]
    seed: int | None
    cost_nusd: int | None
    cost_status: str | None
    cost_unit: str | None
    latency_s: float | None
    prompt_sha256: str | None = None
    n: int | None = None
    width: int | None = None
    height: int | None = None
    input_sha256s: tuple[str, ...] = ()   # an edit's input images and mask, in order (m008 request_json)


class Lookups:
    """Mixed into `Ledger`: each read is retried once on a lost connection, like every other step."""

    engine: Engine
    check_file: Callable[[], None]

    @retried
    def served(self, idempotency_key: str, since: float) -> ServedCall | None:
        """The latest call since `since` that succeeded under this key."""
        with self.engine.connect() as conn:
            row = conn.execute(select(calls).where(calls.c.idempotency_key == idempotency_key,
                                                   calls.c.status == "ok", calls.c.created_at >= since)
                               .order_by(calls.c.created_at.desc()).limit(1)).first()
        return None if row is None else _served(row)

    @retried
    def cache_entry(self, cache_key: str, since: float) -> ServedCall | None:
        """The latest call since `since` that paid for this cache key (not itself a cache hit)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(calls).where(calls.c.cache_key == cache_key, calls.c.status == "ok",
                                                   calls.c.cached == 0, calls.c.created_at >= since)
                               .order_by(calls.c.created_at.desc()).limit(1)).first()
        return None if row is None else _served(row)

    @retried
    def recent_latencies(self, since: float, limit: int = 20_000) -> list[tuple[str, float]]:
        with self.engine.connect() as conn:
            q = (select(calls.c.offering, calls.c.latency_s)
                 .where(calls.c.status == "ok", calls.c.cached == 0, calls.c.created_at >= since)
                 .order_by(calls.c.created_at.desc()).limit(limit))
            return [(o, float(lat)) for o, lat in conn.execute(q)]


def _served(row: Any) -> ServedCall:
    return ServedCall(request_id=row.request_id, created_at=row.created_at, offering=row.offering,
                      image_sha256s=json.loads(row.image_sha256s or "[]"), seed=row.seed, cost_nusd=row.cost_nusd,
                      cost_status=row.cost_status, cost_unit=row.cost_unit, latency_s=row.latency_s,
                      prompt_sha256=row.prompt_sha256, n=row.n, width=row.width, height=row.height,
                      input_sha256s=_inputs(row.request_json))


def _inputs(request_json: str | None) -> tuple[str, ...]:
    """The sha256 of each input image and of the mask the row's request had (none: text-to-image)."""
    try:
        edit = json.loads(request_json or "{}").get("edit") or {}
    except ValueError:
        return ()
    images = [i.get("sha256") for i in edit.get("images", [])]
    return tuple(str(s) for s in [*images, (edit.get("mask") or {}).get("sha256")] if s)
