"""What-if: every recorded call planned again under another policy with today's catalog, and what it would
have cost (the expected cost and the bound of the offering the plan would try first), beside what it did.

Providers count as available (a what-if is about the policy, not about the keys on this machine) and local
models as warm. A call recorded before the ledger kept its planning fields (m008) replays with the size, n and
seed its row has, and is counted as `partial`. With `prices_as_of`, each offering is priced as the catalog
records it on that day (`Catalog.as_of`); calls routed to an offering whose price then is not recorded are
counted by offering, since today's price stood in for theirs."""

from __future__ import annotations

import functools
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from PIL import Image
from sqlalchemy import select

from ..errors import ImageBrokerError
from ..inputs import InputImage, read_input
from ..policies.planner import PlannerState, plan
from ..policies.schema import Policy
from ..providers.catalog import Catalog
from ..types import Adapter, ImageRequest
from .ledger.schema import calls, from_nusd
from .ledger.store import Ledger


@dataclass
class WhatIfGroup:
    key: str
    calls: int = 0
    actual_usd: Decimal = Decimal(0)
    whatif_usd: Decimal = Decimal(0)
    unroutable: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "calls": self.calls, "actual_cost_usd": self.actual_usd,
                "whatif_cost_usd": self.whatif_usd, "unroutable": self.unroutable}


@dataclass
class WhatIf:
    policy: str
    calls: int = 0
    actual_usd: Decimal = Decimal(0)
    whatif_usd: Decimal = Decimal(0)     # expected cost of what the plan would try first
    whatif_bound_usd: Decimal = Decimal(0)
    unpriced: int = 0                    # routed, but to an offering without a price
    routed: int = 0
    unroutable: int = 0
    partial: int = 0                     # replayed from a row without its planning fields
    local_calls: int = 0
    local_gpu_seconds: float = 0.0
    groups: dict[str, WhatIfGroup] = field(default_factory=dict)
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    prices_as_of: date | None = None
    prices_not_recorded: Counter[str] = field(default_factory=Counter)   # offering -> calls routed to it

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "actual": {"calls": self.calls, "cost_usd": self.actual_usd},
            "whatif": {"cost_usd": self.whatif_usd, "bound_usd": self.whatif_bound_usd,
                       "calls_routed": self.routed, "calls_unroutable": self.unroutable,
                       "calls_unpriced": self.unpriced, "calls_local": self.local_calls,
                       "local_gpu_seconds": round(self.local_gpu_seconds, 3),
                       "prices_as_of": self.prices_as_of.isoformat() if self.prices_as_of else None,
                       "prices_not_recorded": dict(self.prices_not_recorded.most_common())},
            "calls_partial": self.partial,
            "groups": [g.as_dict() for g in sorted(self.groups.values(), key=lambda g: (-g.actual_usd, g.key))],
            "moves": [{"from": a, "to": b, "calls": n} for (a, b), n in self.moves.most_common()],
            "unroutable_reasons": _top(self.reasons, 10),
        }


def replayed_request(row: Any) -> tuple[ImageRequest, bool]:
    """The request a call row stands for, as the planner read it, and whether the row had all of it."""
    tags = json.loads(row.tags_json) if row.tags_json else {}
    if not row.request_json:
        fields: dict[str, Any] = {"n": row.n or 1, "seed": row.seed, "tags": tags}
        if row.width and row.height:
            fields.update(width=row.width, height=row.height)
        return ImageRequest(prompt="x", **fields), False
    saved = json.loads(row.request_json)
    chars = int(saved.pop("prompt_chars", 1))
    negative, seeded = saved.pop("negative_prompt", False), saved.pop("seeded", False)
    adapters = tuple(Adapter(ref=a["ref"], scale=a["scale"]) for a in saved.pop("adapters", []))
    saved["control"] = tuple({"kind": c["kind"], "image": _stand_in(c["image"]["width"], c["image"]["height"]),
                              "scale": c["scale"], "start": c["start"], "end": c["end"]}
                             for c in saved.pop("control", []))
    saved["image_prompts"] = tuple({"image": _stand_in(p["image"]["width"], p["image"]["height"]),
                                    "scale": p["scale"]} for p in saved.pop("image_prompts", []))
    edit = saved.pop("edit", None) or {}
    if edit:   # stand-ins of the same sizes: the planner and the prices read sizes, never pixels
        saved["images"] = tuple(_stand_in(i["width"], i["height"]) for i in edit["images"])
        saved["mask"] = _stand_in(edit["mask"]["width"], edit["mask"]["height"]) if edit.get("mask") else None
        saved["strength"] = edit.get("strength")
    return ImageRequest(prompt="x" * max(1, chars), negative_prompt="x" if negative else None,
                        seed=0 if seeded else None, adapters=adapters, tags=tags, **saved), True


@functools.lru_cache(maxsize=64)
def _stand_in(width: int, height: int) -> InputImage:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return read_input(buf.getvalue())


def _top(counts: Counter[str], n: int) -> dict[str, int]:
    """The n most common, and every other as common as the last of them (a cut through a tie would keep
    an arbitrary few), most common first, then by name."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    floor = ranked[n - 1][1] if len(ranked) >= n else 0
    return {k: v for i, (k, v) in enumerate(ranked) if i < n or v >= floor}


def _kind(reason: str) -> str:
    """A rejection reason with its figures as `#`, so that reasons of one kind count together."""
    return re.sub(r"\d+(\.\d+)?", "#", reason)


def _group_key(row: Any, by: str, tags: dict[str, str]) -> str:
    if by.startswith("tag:"):
        return tags.get(by.removeprefix("tag:"), "(untagged)")
    value = getattr(row, by, None)
    return str(value) if value else "(none)"


def whatif(ledger: Ledger, policy: Policy, catalog: Catalog, *, since: float | None = None,
           until: float | None = None, by: str = "provider", prices_as_of: date | None = None) -> WhatIf:
    """Every finished call since `since` and before `until`, planned again under `policy`."""
    out = WhatIf(policy=policy.name, prices_as_of=prices_as_of)
    not_recorded: frozenset[str] = frozenset()
    if prices_as_of is not None:
        catalog, not_recorded = catalog.as_of(prices_as_of)
    state = PlannerState(today=datetime.now(UTC).date())
    where = [calls.c.status != "pending"]
    if since is not None:
        where.append(calls.c.created_at >= since)
    if until is not None:
        where.append(calls.c.created_at < until)
    with ledger.engine.connect() as conn:
        rows = conn.execute(select(calls).where(*where).order_by(calls.c.created_at)).all()
    for row in rows:
        request, whole = replayed_request(row)
        out.partial += not whole
        actual = from_nusd(row.cost_nusd) or Decimal(0)
        out.calls += 1
        out.actual_usd += actual
        key = _group_key(row, by, request.tags)
        group = out.groups.setdefault(key, WhatIfGroup(key))
        group.calls += 1
        group.actual_usd += actual
        try:
            the_plan = plan(request, policy, catalog, state)
        except ImageBrokerError as exc:   # a pinned model the catalog no longer has
            out.unroutable += 1
            group.unroutable += 1
            out.reasons[str(exc).split(":")[0]] += 1
            continue
        if not the_plan.candidates:
            out.unroutable += 1
            group.unroutable += 1
            out.reasons.update({_kind(reason) for r in the_plan.rejected for reason in r.reasons})
            continue
        first = the_plan.candidates[0]
        out.routed += 1
        out.moves[(row.offering or "(none)", first.offering)] += 1
        if first.offering in not_recorded:
            out.prices_not_recorded[first.offering] += 1
        if first.estimated_cost.usd is None:
            out.unpriced += 1
        else:
            out.whatif_usd += first.estimated_cost.usd
            group.whatif_usd += first.estimated_cost.usd
        out.whatif_bound_usd += first.bound_usd or Decimal(0)
        if catalog.offerings[first.offering].kind == "local":
            out.local_calls += 1
            out.local_gpu_seconds += float(first.estimated_cost.units.get("gpu_seconds", 0))
    return out
