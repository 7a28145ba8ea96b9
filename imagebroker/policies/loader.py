"""Loading a policy: a file or a built-in preset, following `extends`. The only IO in `policies/`."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._yaml import Located, load_file, load_text
from ..errors import ConfigError
from ..providers.catalog import deep_merge
from .schema import Policy

DEFAULT_PRESET = "default"
POLICY_ENV = "IMAGEBROKER_POLICY"
LOCAL_POLICY_FILE = "imagebroker.yaml"
MAX_EXTENDS = 8


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


def _resolve(located: Located, depth: int = 0) -> dict[str, Any]:
    data = located.data
    if not isinstance(data, dict):
        raise ConfigError("a policy is a YAML mapping", file=located.file, line=1)
    parent = data.get("extends")
    if not parent:
        return data
    if depth >= MAX_EXTENDS:
        raise ConfigError("extends goes too deep (a cycle?)", file=located.file,
                          line=located.line(("extends",)), field="extends")
    here = Path(located.file).parent if not located.file.startswith("<") else None
    base = _resolve(_locate(str(parent), here), depth + 1)
    merged = deep_merge({k: v for k, v in base.items() if k not in ("name", "extends")}, data)
    return merged


def load_policy(ref: str | Path | Policy | None = None) -> Policy:
    """A policy from an object, a file path or a preset name; with None, from $IMAGEBROKER_POLICY,
    then ./imagebroker.yaml, then the built-in default preset."""
    if isinstance(ref, Policy):
        return ref
    if ref is None:
        ref = os.environ.get(POLICY_ENV) or (
            LOCAL_POLICY_FILE if Path(LOCAL_POLICY_FILE).is_file() else DEFAULT_PRESET)
    located = _locate(str(ref), None)
    data = _resolve(located)
    data.setdefault("name", Path(str(ref)).stem if located.file[0] != "<" else str(ref))
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise located.error(exc) from None


def located_policy(ref: str | Path) -> Located:
    """The policy file itself, for error locations in its `offerings` overrides."""
    return _locate(str(ref), None)
