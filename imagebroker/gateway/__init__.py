"""The team gateway: imagebroker as an OpenAI-compatible HTTP service (`imagebroker serve`).

`create_app` is imported on first use, so that the command line (which reads this package's settings) does not
need the gateway's extra installed."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(name)
