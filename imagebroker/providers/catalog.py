"""The catalog: every offering, from the YAML data shipped beside the providers plus the user's own."""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import date
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._yaml import Located, load_file, load_text
from ..errors import ConfigError
from .offering import Offering

STALE_AFTER_DAYS = 90


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _offering(raw: Mapping[str, Any], located: Located, path: tuple[str | int, ...]) -> Offering:
    raw = dict(raw)
    raw.setdefault("id", f"{raw.get('provider')}/{raw.get('model')}")
    try:
        return Offering.model_validate(raw)
    except ValidationError as exc:
        raise located.error(exc, path) from None


def parse_catalog_file(located: Located) -> tuple[str, list[Offering]]:
    data = located.data
    if not isinstance(data, dict) or not isinstance(data.get("offerings"), list):
        raise ConfigError("a catalog file needs `provider`, `catalog_version` and an `offerings` list",
                          file=located.file, line=1)
    unknown = {k for k in data if not k.startswith("x-")} - {
        "provider", "catalog_version", "pricing_urls", "defaults", "offerings"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError("unknown key (not allowed here)", file=located.file,
                          line=located.line((key,)), field=key)
    defaults = dict(data.get("defaults") or {}, provider=data["provider"])
    offerings = [
        _offering(deep_merge(defaults, item), located, ("offerings", i))
        for i, item in enumerate(data["offerings"])
    ]
    return str(data.get("catalog_version", "")), offerings


class Catalog:
    """All offerings by id, with aliases. Immutable; `with_overrides` returns a new one."""

    def __init__(self, offerings: Iterable[Offering], version: str) -> None:
        self.offerings: dict[str, Offering] = {}
        for o in sorted(offerings, key=lambda x: x.id):
            if o.id in self.offerings:
                raise ConfigError(f"offering {o.id} is defined twice")
            self.offerings[o.id] = o
        self.version = version
        # offering id -> index of the first matching pattern, per pattern list (the planner's
        # prefer/deny/last_resort lists: policy data, never request fields)
        self.pattern_index: dict[tuple[str, ...], dict[str, int]] = {}
        self._aliases = {a: o.id for o in self.offerings.values() for a in o.aliases}

    def __iter__(self):
        return iter(self.offerings.values())

    def __len__(self) -> int:
        return len(self.offerings)

    def providers(self) -> list[str]:
        return sorted({o.provider for o in self})

    def resolve(self, name: str) -> Offering | None:
        """An offering by id or alias."""
        oid = name if name in self.offerings else self._aliases.get(name)
        return self.offerings.get(oid) if oid else None

    def matching(self, pattern: str) -> list[Offering]:
        """Offerings whose id, provider or alias matches a glob (`replicate/*`, `local`)."""
        return [o for o in self if pattern == o.provider or fnmatch.fnmatchcase(o.id, pattern)
                or pattern in o.aliases]

    def active(self, today: date) -> list[Offering]:
        return [o for o in self if not o.retired(today)]

    def as_of(self, day: date) -> tuple[Catalog, frozenset[str]]:
        """The catalog priced as on `day` (`Offering.price_on`), and the offerings whose price that day it does
        not record (today's price stands in for theirs)."""
        priced, unknown = [], set()
        for o in self:
            rule, known = o.price_on(day)
            if not known:
                unknown.add(o.id)
            priced.append(o if rule is o.price else o.model_copy(update={"price": rule}))
        return Catalog(priced, f"{self.version}@{day}"), frozenset(unknown)

    def with_overrides(self, items: list[dict[str, Any]], located: Located | None = None,
                       base_path: tuple[str | int, ...] = ("offerings",)) -> Catalog:
        """User additions and overrides: an item whose id exists is merged over it (a negotiated
        price, say); a new id is a whole new offering (a private model)."""
        if not items:
            return self
        merged = dict(self.offerings)
        loc = located or Located({}, {}, "<policy>")
        for i, item in enumerate(items):
            oid = item.get("id") or f"{item.get('provider')}/{item.get('model')}"
            base = merged[oid].model_dump() if oid in merged else {}
            o = _offering(deep_merge(base, item), loc, base_path + (i,))
            merged[o.id] = o
        digest = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()
        return Catalog(merged.values(), f"{self.version}+user.{digest[:8]}")


def stale(o: Offering, today: date) -> bool:
    checked = o.price.checked if o.price else o.checked
    return (today - checked).days > STALE_AFTER_DAYS


@cache
def builtin_catalog() -> Catalog:
    """Every catalog file shipped in `imagebroker/providers/data/`, and those installed provider plugins ship."""
    offerings: list[Offering] = []
    versions, digest = [], hashlib.sha256()
    folder = resources.files("imagebroker.providers") / "data"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        text = entry.read_text(encoding="utf-8")
        digest.update(text.encode())
        version, items = parse_catalog_file(load_text(text, f"imagebroker/providers/data/{entry.name}"))
        versions.append(version)
        offerings.extend(items)
    from .registry import plugin_catalog_texts  # (registry imports provider classes: only when needed)

    for where, text in plugin_catalog_texts():
        digest.update(text.encode())
        _, items = parse_catalog_file(load_text(text, where))
        offerings.extend(items)
    return Catalog(offerings, f"{max(versions, default='0')}+{digest.hexdigest()[:8]}")


def load_catalog_file(path: Path) -> list[Offering]:
    return parse_catalog_file(load_file(path))[1]
