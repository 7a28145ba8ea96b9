"""Providers are found through the entry-point group `imagebroker.providers` (built-ins included)."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from ..errors import ConfigError
from .base import Provider

GROUP = "imagebroker.providers"
_runtime: dict[str, type[Provider]] = {}


@cache
def _entry_points() -> dict[str, object]:
    found: dict[str, object] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in found:
            raise ConfigError(f"two packages register a provider named {ep.name!r}")
        found[ep.name] = ep
    return found


def provider_names() -> list[str]:
    return sorted(set(_entry_points()) | set(_runtime))


def provider_class(name: str) -> type[Provider]:
    """Import a provider class on first use (so torch, SDKs and the like load only when needed)."""
    if name in _runtime:
        return _runtime[name]
    ep = _entry_points().get(name)
    if ep is None:
        raise ConfigError(f"no provider named {name!r} is installed; installed: "
                          f"{', '.join(provider_names())}")
    cls = ep.load()  # type: ignore[attr-defined]
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ConfigError(f"entry point {name!r} does not name an imagebroker Provider subclass")
    return cls


def register(cls: type[Provider]) -> type[Provider]:
    """Register a provider class at run time (tests, notebooks). Entry points are the usual way."""
    _runtime[cls.name] = cls
    return cls


def plugin_catalog_texts() -> list[tuple[str, str]]:
    """(where, YAML text) of every catalog file a third-party provider ships (`Provider.catalog_file`, read
    from its package). Built-in providers' offerings are in `providers/data/` and are not loaded here."""
    from importlib import resources

    found = []
    for name, ep in sorted(_entry_points().items()):
        if str(getattr(ep, "value", "")).startswith("imagebroker."):
            continue
        cls = provider_class(name)
        if cls.catalog_file:
            package = cls.__module__.rpartition(".")[0] or cls.__module__
            text = (resources.files(package) / cls.catalog_file).read_text(encoding="utf-8")
            found.append((f"{package}/{cls.catalog_file}", text))
    return found
