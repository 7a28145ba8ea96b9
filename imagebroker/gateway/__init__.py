"""The team gateway: imagebroker as an OpenAI-compatible HTTP service (`imagebroker serve`)."""

from .app import create_app

__all__ = ["create_app"]
