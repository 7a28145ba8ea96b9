"""Loading a policy: a file or a built-in preset, following `extends`. The only IO in `policies/`."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._yaml import Located, load_file, load_text
from ..errors import ConfigError
from ..providers.catalog import builtin_catalog, deep_merge
from ..providers.offering import Offering
from .schema import Policy

DEFAULT_PRESET = "default"
POLICY_ENV = "IMAGEBROKER_POLICY"
LOCAL_POLICY_FILE = "imagebroker.yaml"
MAX_EXTENDS = 8
# what an entry may lack on its own, yet have once merged over a catalog given to the Broker
NOT_JUDGED_AT_LOAD = frozenset({"missing", "union_tag_not_found"})


def preset_names() -> list[str]:
    folder = resources.files("imagebroker.policies") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset(name: str) -> Located:
    entry = resources.files("imagebroker.policies") / "presets" / f"{name}.yaml"
    if not entry.is_file():
        raise ConfigError(f"no preset named {name!r}; presets: {', '.join(preset_names())}")
    return load_text(entry.read_text(encoding="utf-8"), f"<preset {name}>")


def _locate(ref: str, relative_to: Path | None) -> Located:
    path = Path(ref)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if ref.endswith((".yaml", ".yml")) or os.sep in ref or path.is_file():
        if not path.is_file():
            raise ConfigError(f"policy file {path} does not exist")
        return load_file(path)
    return _preset(ref)


def _resolve(located: Located, depth: int = 0) -> tuple[dict[str, Any], Located]:
    """The policy with its `extends` chain merged in, and the file its `offerings:` list is from
    (a list is not merged: the nearest file that has one gives it whole)."""
    data = located.data
    if not isinstance(data, dict):
        raise ConfigError("a policy is a YAML mapping", file=located.file, line=1)
    parent = data.get("extends")
    if not parent:
        return data, located
    if depth >= MAX_EXTENDS:
        raise ConfigError("extends goes too deep (a cycle?)", file=located.file,
                          line=located.line(("extends",)), field="extends")
    here = Path(located.file).parent if not located.file.startswith("<") else None
    base, base_offerings = _resolve(_locate(str(parent), here), depth + 1)
    merged = deep_merge({k: v for k, v in base.items() if k not in ("name", "extends")}, data)
    return merged, located if "offerings" in data else base_offerings


def _check_offerings(policy: Policy, located: Located) -> None:
    """A bad value in the policy's own `offerings:` (a negative price, say) fails at load, naming
    the file and line; the catalog merges these entries later (`effective_catalog`), where no file
    is known. Each entry is checked as the catalog will read it, merged over the built-in offering
    of its id (alone when it is a new one), and only what the entry itself gives is judged here: a
    field it lacks, or one from the built-in entry, is left to that later check, since the Broker
    may be given a catalog of its own that the entry overrides."""
    builtin = builtin_catalog().offerings
    for i, item in enumerate(policy.offerings):
        oid = item.get("id") or f"{item.get('provider')}/{item.get('model')}"
        base = builtin[oid].model_dump() if oid in builtin else {}
        try:
            Offering.model_validate(deep_merge(base, {"id": oid, **item}))
        except ValidationError as exc:
            here = ("offerings", i)
            own = [e for e in exc.errors() if e["type"] not in NOT_JUDGED_AT_LOAD
                   and located.has(located.path(e, here))]
            if own:
                raise located.error_from(own, here) from None


def load_policy(ref: str | Path | Policy | None = None) -> Policy:
    """A policy from an object, a file path or a preset name; with None, from $IMAGEBROKER_POLICY,
    then ./imagebroker.yaml, then the built-in default preset."""
    if isinstance(ref, Policy):
        return ref
    if ref is None:
        ref = os.environ.get(POLICY_ENV) or (
            LOCAL_POLICY_FILE if Path(LOCAL_POLICY_FILE).is_file() else DEFAULT_PRESET)
    located = _locate(str(ref), None)
    data, offerings_file = _resolve(located)
    data.setdefault("name", Path(str(ref)).stem if located.file[0] != "<" else str(ref))
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise located.error(exc) from None
    if policy.offerings:
        _check_offerings(policy, offerings_file)
    policy._located, policy._offerings_located = located, offerings_file
    return policy


def located_policy(ref: str | Path) -> Located:
    """The policy file itself, for error locations in its `offerings` overrides."""
    return _locate(str(ref), None)
