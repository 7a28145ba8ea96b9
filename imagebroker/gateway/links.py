"""`response_format=url`: links to images in the broker's image store, signed (HMAC-SHA256) and expiring, served
by the gateway at `GET /v1/images/files/{sha256}.{ext}?expires=...&sig=...`. The signing key is
`IMAGEBROKER_GATEWAY_SIGNING_KEY`; without it each process makes its own, so a link works only on the
worker that made it: set it when running several workers or hosts."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time

SIGNING_ENV = "IMAGEBROKER_GATEWAY_SIGNING_KEY"
LINK_TTL_S = 3600
_PROCESS_KEY = secrets.token_bytes(32)
NAME = re.compile(r"^([0-9a-f]{64})\.(png|jpeg|webp)$")
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def _key() -> bytes:
    configured = os.environ.get(SIGNING_ENV)
    return configured.encode() if configured else _PROCESS_KEY


def _sig(name: str, expires: int) -> str:
    return hmac.new(_key(), f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()


def signed_path(sha256: str, fmt: str, now: float | None = None) -> str:
    name = f"{sha256}.{fmt}"
    expires = int((now or time.time()) + LINK_TTL_S)
    return f"/v1/images/files/{name}?expires={expires}&sig={_sig(name, expires)}"


def check(name: str, expires: str | None, sig: str | None, now: float | None = None) -> str | None:
    """Why the link may not be served (None: it may)."""
    if not NAME.match(name):
        return "not an image link"
    try:
        when = int(expires or "")
    except ValueError:
        return "the link has no valid expiry"
    if when < (now or time.time()):
        return "the link has expired"
    if not sig or not hmac.compare_digest(sig, _sig(name, when)):
        return "the link's signature does not match"
    return None
