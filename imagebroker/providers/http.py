"""What HTTP providers share: one client per provider, the one mapping of HTTP statuses and
transport failures onto imagebroker's error tree, and the rules for URLs a provider's answer names.

Keys stay home. A provider's answer may name URLs to call next (BFL's `polling_url`, fal's
`status_url`) and URLs to fetch results from; neither is trusted because the answer came over TLS:

- credentials (`keyed_url`) go only to the origin of the base URL in use, or to one of the provider's
  own official hosts (`HttpProvider.key_hosts`, data in the provider's module) when that base URL is
  itself one of them; a URL elsewhere is a non-retryable `BadProviderResponse` naming its origin, and
  no request is made. `send` never follows a redirect: a redirect is such an answer too;
- results (`download`) are fetched without credentials, over https (http only where the base URL is
  itself http on a loopback or private address), never from a link-local, multicast, unspecified or
  reserved address, from a loopback or private one only when the base URL is on one too (every address
  the host resolves to is checked), following at most `MAX_REDIRECTS` redirects, each checked like the
  first, and at most `MAX_RESULT_BYTES` long. `data:` URLs are decoded (base64, same bound). A URL that
  breaks a rule is a non-retryable `BadProviderResponse`: the job was paid for, and asking again would
  pay again for the same answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ClassVar, TypeVar

import httpx2

from ..errors import (
    AuthError,
    BadProviderResponse,
    ContentRejected,
    ModelNotFound,
    OutcomeUnknown,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from .base import Provider, mark_submitted
from .transport import transport_for

_TRANSFER_HEADERS = ("content-encoding", "content-length", "transfer-encoding")


def _decoded(headers: httpx2.Headers) -> list[tuple[str, str]]:
    """Headers for a response rebuilt from its decoded body (which has no encoding or length left)."""
    return [(k, v) for k, v in headers.multi_items() if k.lower() not in _TRANSFER_HEADERS]

T = TypeVar("T")
REQUEST_ID_HEADERS = ("x-request-id", "x-fal-request-id", "request-id", "x-amzn-requestid")
MODERATION_WORDS = ("moderat", "safety", "content_policy", "content policy", "nsfw")
MAX_REDIRECTS = 3  # redirects a result download follows, each hop checked like the first
MAX_RESULT_BYTES = 128 << 20  # one result on the wire; the broker's image checks apply a tighter bound
DEFAULT_PORTS = {"http": 80, "https": 443}


def retry_after(headers: httpx2.Headers, body: Any = None) -> float | None:
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


def status_error(status: int, text: str, headers: httpx2.Headers, **where: Any) -> ProviderError:
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
            "api key not valid" in lowered or "api_key_invalid" in lowered or "incorrect api key" in lowered):
        return AuthError(msg, **kw)
    if status == 404 or "model_not_found" in lowered:
        return ModelNotFound(msg, **kw)
    if status in (400, 403, 422, 451) and any(w in lowered for w in MODERATION_WORDS):
        return ContentRejected(msg, **kw)
    if status in (408, 409) or status >= 500:
        return ProviderUnavailable(msg, **kw)
    return ProviderError(msg, **kw)


def origin(url: httpx2.URL) -> str:
    """scheme://host:port, the port always written: what error messages name (never the whole URL,
    whose query may carry a signature)."""
    port = url.port or DEFAULT_PORTS.get(url.scheme)
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}" + (f":{port}" if port else "")


def _host_matches(host: str, pattern: str) -> bool:
    """`api.bfl.ai` matches itself; `*.bfl.ai` matches any name under bfl.ai."""
    return host.endswith(pattern[1:]) if pattern.startswith("*.") else host == pattern


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """loopback, forbidden (link-local, multicast, unspecified, reserved), private or public."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "forbidden"
    return "public" if ip.is_global else "private"


async def address_kinds(host: str, port: int | None, where: dict[str, Any]) -> set[str]:
    """The kinds of every address `host` stands for: an IP literal is read, never looked up."""
    try:
        return {_kind(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ProviderUnavailable(f"cannot resolve {host}: {type(exc).__name__}", **where) from None
    return {_kind(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])) for info in infos}


async def check_result_url(url: str, base_url: str | None, where: dict[str, Any]) -> httpx2.URL:
    """The URL, if a result may be fetched from it (the rules are in this module's docstring);
    otherwise a BadProviderResponse naming its origin."""
    try:
        target = httpx2.URL(url)
        base = httpx2.URL(base_url or "")
    except (httpx2.InvalidURL, TypeError):
        raise BadProviderResponse("result URL is not a URL", **where) from None
    base_kinds = await address_kinds(base.host, base.port, where) if base.host else {"public"}
    home = "public" not in base_kinds  # the base URL is itself loopback or private
    if not (target.scheme == "https" or (target.scheme == "http" and base.scheme == "http" and home)):
        raise BadProviderResponse(f"result URL {origin(target)} refused: https only", **where)
    if not target.host:
        raise BadProviderResponse(f"result URL {origin(target)} refused: no host", **where)
    kinds = await address_kinds(target.host, target.port or DEFAULT_PORTS[target.scheme], where)
    if "forbidden" in kinds or (not home and kinds != {"public"}):
        what = "a link-local, multicast or unspecified" if "forbidden" in kinds else "a private"
        raise BadProviderResponse(f"result URL {origin(target)} refused: {what} address", **where)
    return target


def data_url(url: str, where: dict[str, Any], limit: int | None = None) -> bytes:
    """The bytes of a base64 `data:` URL, at most `limit` (default MAX_RESULT_BYTES)."""
    limit = limit or MAX_RESULT_BYTES
    head, _, payload = url.partition(",")
    if not head.lower().endswith(";base64"):
        raise BadProviderResponse("data: URL that is not base64", **where)
    if len(payload) > limit * 4 // 3 + 4:
        raise BadProviderResponse(f"data: URL larger than {_mib(limit)}", **where)
    try:
        return base64.b64decode(payload)
    except (binascii.Error, ValueError):
        raise BadProviderResponse("data: URL that is not valid base64", **where) from None


def redirect_target(resp: httpx2.Response, where: dict[str, Any]) -> httpx2.URL:
    try:
        return resp.url.join(resp.headers["location"])
    except httpx2.InvalidURL:
        raise BadProviderResponse("redirected to a location that is not a URL", **where) from None


NOT_SENT = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout, httpx2.UnsupportedProtocol)
POLL_RETRIES = 5  # transient failures polling or downloading an accepted job, tried again in place
DOWNLOAD_RETRIES = 2


@contextlib.contextmanager
def transport_errors(where: dict[str, Any], submit: bool = False) -> Iterator[None]:
    """httpx2's transport failures as imagebroker errors. For a `submit` (a request that starts paid
    work), a failure after the request may have been sent (a read timeout, a reset mid-answer) is an
    `OutcomeUnknown`; failing to connect means nothing was sent, and may be tried again."""
    try:
        yield
    except httpx2.TimeoutException as exc:
        if submit and not isinstance(exc, NOT_SENT):
            raise OutcomeUnknown(f"no answer after sending: {type(exc).__name__}", **where) from None
        raise ProviderUnavailable(f"timed out: {type(exc).__name__}", **where) from None
    except httpx2.TransportError as exc:
        if submit and not isinstance(exc, NOT_SENT):
            raise OutcomeUnknown(f"connection lost after sending: {type(exc).__name__}", **where) from None
        raise ProviderUnavailable(f"connection failed: {type(exc).__name__}", **where) from None
    except httpx2.DecodingError:   # an answer came, in an encoding it does not hold to (as malformed JSON)
        raise BadProviderResponse("answer could not be decoded by its Content-Encoding", **where) from None


def new_client() -> httpx2.AsyncClient:
    """The providers' HTTP client: httpx2 on the aiohttp transport (`transport.py`)."""
    limits = httpx2.Limits(max_connections=200, max_keepalive_connections=50)
    return httpx2.AsyncClient(timeout=httpx2.Timeout(120.0, connect=10.0), limits=limits,
                              transport=transport_for(limits))


class HttpProvider(Provider):
    """A provider that speaks plain HTTP with httpx2."""

    # official hosts besides the base URL's own origin that may be sent the key (https, port 443), when
    # the base URL is itself on one of them: `*.name` for any name under it (BFL's regional hosts)
    key_hosts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._client: httpx2.AsyncClient | None = None

    def client(self) -> httpx2.AsyncClient:
        if self._client is None:
            self._client = new_client()
        return self._client

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def send(self, method: str, url: str, *, where: dict[str, Any], accept: tuple[int, ...] = (),
                   submit: bool | None = None, **kw: Any) -> httpx2.Response:
        """The request; transport failures and error statuses raised as imagebroker errors, except the
        statuses in `accept`, whose responses the caller reads itself (ComfyUI's 400 node errors).
        Redirects are never followed (they would carry the key): one is a BadProviderResponse.
        `submit` (default: a POST) marks a request that starts paid work (see `transport_errors`);
        the body is read up to MAX_RESULT_BYTES."""
        submit = method == "POST" if submit is None else submit
        if submit:
            mark_submitted()
        with transport_errors(where, submit):
            async with self.client().stream(method, url, **kw) as streamed:
                body = await self._read_bounded(streamed, where)
        resp = httpx2.Response(streamed.status_code, headers=_decoded(streamed.headers), content=body,
                              request=streamed.request)
        if resp.is_redirect:
            to = origin(redirect_target(resp, where))
            raise BadProviderResponse(f"{resp.request.url.path} redirected to {to}: not followed", **where)
        if resp.status_code >= 400 and resp.status_code not in accept:
            raise status_error(resp.status_code, resp.text, resp.headers, **where)
        return resp

    def keyed_url(self, url: Any, base_url: str | None, where: dict[str, Any]) -> str:
        """A URL the provider's answer named, to be called with the key (a polling or status URL): it
        must be on the base URL's origin, or on one of `key_hosts` when the base URL is; otherwise a
        BadProviderResponse naming its origin, before any request."""
        try:
            target, base = httpx2.URL(url), httpx2.URL(base_url or "")
        except (httpx2.InvalidURL, TypeError):
            raise BadProviderResponse("answer named a URL that is not a URL", **where) from None
        official = all(u.scheme == "https" and (u.port or 443) == 443
                       and any(_host_matches(u.host, p) for p in self.key_hosts) for u in (target, base))
        if origin(target) != origin(base) and not official:
            raise BadProviderResponse(f"answer named {origin(target)}, not {origin(base)}: the key is "
                                      "not sent there", **where)
        return str(url)

    @staticmethod
    def json(resp: httpx2.Response, where: dict[str, Any]) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise BadProviderResponse(f"malformed JSON from {resp.request.url.path}", **where) from None

    async def download(self, url: Any, where: dict[str, Any], *, base_url: str | None = None) -> bytes:
        """A result, fetched at once (result URLs expire: Replicate's after an hour, BFL's after ten
        minutes) by the rules in this module's docstring, from the answer to a call to `base_url`
        (None: the strictest rules, those of a public https base URL). The job is done and paid for:
        a transient failure is tried again here, and one that persists is an `OutcomeUnknown`, never a
        reason to submit the job again."""
        return await self.again(lambda: self._download(str(url), where, base_url), where,
                                "the result could not be downloaded")

    async def again(self, fetch: Callable[[], Awaitable[T]], where: dict[str, Any], what: str) -> T:
        """`fetch()` for a job already done and paid for: a transient failure is tried again here (up to
        DOWNLOAD_RETRIES), and one that persists is an `OutcomeUnknown` saying `what`, never a reason to
        submit the job again."""
        for attempt in range(DOWNLOAD_RETRIES + 1):
            try:
                return await fetch()
            except (ProviderUnavailable, RateLimited) as exc:
                if attempt == DOWNLOAD_RETRIES:
                    raise OutcomeUnknown(f"{what}: {exc}", **where) from None
                await asyncio.sleep(0.25 * 2**attempt)
        raise AssertionError("unreachable")

    async def _download(self, url: str, where: dict[str, Any], base_url: str | None) -> bytes:
        if url[:5].lower() == "data:":
            return data_url(url, where, self.max_bytes)
        for _ in range(MAX_REDIRECTS + 1):
            target = await check_result_url(url, base_url, where)
            with transport_errors(where):
                async with self.client().stream("GET", target) as resp:
                    if not resp.is_redirect:
                        return await self._read(resp, where)
                    url = str(redirect_target(resp, where))
        raise BadProviderResponse(f"result URL redirected more than {MAX_REDIRECTS} times", **where)

    @property
    def max_bytes(self) -> int:
        """The most one answer or result may hold: `providers.NAME.max_response_bytes`, else
        MAX_RESULT_BYTES."""
        return self.settings.max_response_bytes or MAX_RESULT_BYTES

    async def _read_bounded(self, resp: httpx2.Response, where: dict[str, Any]) -> bytes:
        limit = self.max_bytes
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused before a byte of the body is read
            raise BadProviderResponse(f"answer of {_mib(int(declared))}, above {_mib(limit)}", **where)
        body = bytearray()
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise BadProviderResponse(f"answer larger than {_mib(limit)}", **where)
        return bytes(body)

    async def _read(self, resp: httpx2.Response, where: dict[str, Any]) -> bytes:
        body = await self._read_bounded(resp, where)
        if resp.status_code >= 400:
            text = bytes(body[:2000]).decode(errors="replace")
            raise status_error(resp.status_code, text, resp.headers, **where)
        return bytes(body)

    async def poll(self, check: Callable[[], Awaitable[T | None]], *, interval: float, deadline_s: float,
                   where: dict[str, Any]) -> T:
        """Call `check` until it returns a value; back off from `interval` up to 2 s. The job was
        accepted (and may be billed): a poll that fails transiently is tried again, up to
        POLL_RETRIES in a row, and a job still running at the deadline is an `OutcomeUnknown`."""
        mark_submitted()
        end, failures = time.monotonic() + deadline_s, 0
        while True:
            try:
                result = await check()
                failures = 0
            except (ProviderUnavailable, RateLimited) as exc:
                failures += 1
                if failures > POLL_RETRIES:
                    raise OutcomeUnknown(f"polling kept failing: {exc}", **where) from None
                result = None
            if result is not None:
                return result
            if time.monotonic() > end:
                raise OutcomeUnknown(f"still running after {deadline_s:g} s", **where)
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 2.0)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"
