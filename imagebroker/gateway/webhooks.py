"""A finished async job announced to its key's webhook: a POST of `{id, object, status, http_status}` (the images
are fetched from `GET /v1/images/jobs/{id}`), signed as `X-Imagebroker-Signature: t=UNIX,v1=HEX`, where HEX is
HMAC-SHA256 of `"{t}." + body` under the key's webhook secret (printed once by `keys create --webhook`).
A receiver checks the signature and that `t` is recent. Tried three times, then logged and left."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx2

SIGNATURE_HEADER = "X-Imagebroker-Signature"
ATTEMPTS = 3
log = logging.getLogger("imagebroker.gateway")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, max_age_s: float = 300, now: float | None = None) -> bool:
    """What a receiver does: the signature matches and is recent."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    fresh = abs((now or time.time()) - timestamp) <= max_age_s
    return fresh and hmac.compare_digest(signature(secret, timestamp, body), header)


async def announce(url: str, secret: str, payload: dict[str, Any]) -> bool:
    body = json.dumps(payload).encode()
    async with httpx2.AsyncClient(timeout=10, follow_redirects=False) as client:
        for attempt in range(ATTEMPTS):
            headers = {"content-type": "application/json",
                       SIGNATURE_HEADER: signature(secret, int(time.time()), body)}
            try:
                resp = await client.post(url, content=body, headers=headers)
                if resp.is_success:
                    return True
                why = f"HTTP {resp.status_code}"
            except httpx2.HTTPError as exc:
                why = type(exc).__name__
            if attempt + 1 < ATTEMPTS:
                await asyncio.sleep(0.5 * 2**attempt)
    log.warning("webhook for job %s not delivered after %d tries (%s)", payload.get("id"), ATTEMPTS, why)
    return False
