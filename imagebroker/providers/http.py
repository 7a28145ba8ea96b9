"""What HTTP providers share: one client per provider, and the one mapping of HTTP statuses and
transport failures onto imagebroker's error tree."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

from ..errors import (
    AuthError,
    BadProviderResponse,
    ContentRejected,
    ModelNotFound,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from .base import Provider

T = TypeVar("T")
REQUEST_ID_HEADERS = ("x-request-id", "x-fal-request-id", "request-id", "x-amzn-requestid")
MODERATION_WORDS = ("moderat", "safety", "content_policy", "content policy", "nsfw")


def retry_after(headers: httpx.Headers, body: Any = None) -> float | None:
    for name in ("retry-after-ms", "retry-after"):
        value = headers.get(name)
        if value:
            try:
                return float(value) / (1000 if name.endswith("ms") else 1)
            except ValueError:
                return None
    if isinstance(body, dict) and isinstance(body.get("retry_after"), (int, float)):
        return float(body["retry_after"])
    return None


def status_error(status: int, text: str, headers: httpx.Headers, **where: Any) -> ProviderError:
    """The one place an HTTP status becomes an imagebroker error."""
    request_id = next((headers[h] for h in REQUEST_ID_HEADERS if h in headers), None)
    msg = f"HTTP {status}: {text[:300]}"
    kw = {"status": status, "request_id": request_id, **where}
    lowered = text.lower()
    if status == 429:
        if "insufficient_quota" in lowered:  # billing, not throttling: retrying will not help
            return AuthError(msg, **kw)
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        return RateLimited(msg, retry_after=retry_after(headers, body), **kw)
    if (status in (401, 402, 403) and not any(w in lowered for w in MODERATION_WORDS)) or (
            "api key not valid" in lowered or "api_key_invalid" in lowered):
        return AuthError(msg, **kw)
    if status == 404 or "model_not_found" in lowered:
        return ModelNotFound(msg, **kw)
    if status in (400, 403, 422, 451) and any(w in lowered for w in MODERATION_WORDS):
        return ContentRejected(msg, **kw)
    if status in (408, 409) or status >= 500:
        return ProviderUnavailable(msg, **kw)
    return ProviderError(msg, **kw)


class HttpProvider(Provider):
    """A provider that speaks plain HTTP with httpx."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(120.0, connect=10.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        return self._client

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def send(self, method: str, url: str, *, where: dict[str, Any], accept: tuple[int, ...] = (),
                   **kw: Any) -> httpx.Response:
        """The request; transport failures and error statuses raised as imagebroker errors, except the
        statuses in `accept`, whose responses the caller reads itself (ComfyUI's 400 node errors)."""
        try:
            resp = await self.client().request(method, url, **kw)
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(f"timed out: {type(exc).__name__}", **where) from None
        except httpx.TransportError as exc:
            raise ProviderUnavailable(f"connection failed: {type(exc).__name__}", **where) from None
        if resp.status_code >= 400 and resp.status_code not in accept:
            raise status_error(resp.status_code, resp.text, resp.headers, **where)
        return resp

    @staticmethod
    def json(resp: httpx.Response, where: dict[str, Any]) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise BadProviderResponse(f"malformed JSON from {resp.request.url.path}", **where) from None

    async def download(self, url: str, where: dict[str, Any]) -> bytes:
        """Result URLs expire (Replicate after an hour, BFL after ten minutes): fetch them at once."""
        if url.startswith("data:"):
            import base64

            return base64.b64decode(url.split(",", 1)[1])
        return (await self.send("GET", url, where=where)).content

    async def poll(self, check: Callable[[], Awaitable[T | None]], *, interval: float, deadline_s: float,
                   where: dict[str, Any]) -> T:
        """Call `check` until it returns a value; back off from `interval` up to 2 s."""
        end = time.monotonic() + deadline_s
        while True:
            result = await check()
            if result is not None:
                return result
            if time.monotonic() > end:
                raise ProviderUnavailable(f"still running after {deadline_s:g} s", **where)
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 2.0)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
