"""The providers' HTTP transport: httpx2's client API (URLs, headers, multipart, redirects refused, content
decoding, timeouts, its exception classes) over aiohttp's connection pool and C parser underneath.

Why: a provider call is the one network hop on every request, and httpx2's own transport (httpcore2 on
anyio, h11's pure-Python parser) costs ~0.75 ms of CPU per loopback POST on this machine, aiohttp ~0.25 ms
(docs/benchmarks.md, issue 10, step 3). Through the gateway that difference is most of its overhead. LiteLLM
and the openai SDK's `DefaultAioHttpClient` do the same swap; this one keeps what the adapters rely on:

- nothing is decoded, followed or remembered here: aiohttp's decompression, redirects and cookies are off, so
  httpx2 decodes (and `HttpProvider` bounds what a compressed answer may inflate to), never follows a
  redirect, and sends only the headers it built;
- timeouts are httpx2's per request: `pool` + `connect` bound getting a connection, `connect` opening one,
  `read` each read (aiohttp has no `write` timeout: an upload to a stalled server is bounded by the
  attempt's own timeout, `execution._send`);
- failures are httpx2's exceptions, and whether anything reached the provider is kept: a failure to connect
  (DNS, refused, TLS, a pool or connect timeout) is a `ConnectError`/`ConnectTimeout`, nothing sent; anything
  after is a read or protocol error, so a paid call is never taken for one not sent (`http.transport_errors`).

One aiohttp session per event loop (a session belongs to its loop). Where the environment names a proxy
(HTTP_PROXY, HTTPS_PROXY, ALL_PROXY), `transport_for` gives none, so that httpx2 uses its own transport, which
honours those and NO_PROXY as it always has (httpx2 ignores them for a transport given to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from urllib.request import getproxies

import aiohttp
import httpx2
from multidict import CIMultiDict
from yarl import URL

# the headers aiohttp would add itself when the request lacks them; httpx2 already chose the request's own
_NOT_ADDED = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
MAX_HEADER_BYTES = 16 << 10   # one response header line, as h11 allows (aiohttp's default is 8 KiB)


@contextlib.contextmanager
def _as_httpx(request: httpx2.Request) -> Iterator[None]:
    """aiohttp's failures as httpx2's. aiohttp wraps every failure to open a connection in
    `ClientConnectorError` (or a connection timeout); any other came after, when the request may have
    reached the provider."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx2.ConnectTimeout(str(exc) or "timed out getting a connection", request=request) from exc
    except (aiohttp.SocketTimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx2.ReadTimeout(str(exc) or "timed out reading the answer", request=request) from exc
    except aiohttp.ClientConnectorError as exc:   # DNS, refused, TLS: the connection never opened
        raise httpx2.ConnectError(str(exc), request=request) from exc
    except aiohttp.InvalidUrlClientError as exc:
        raise httpx2.UnsupportedProtocol(str(exc), request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
        raise httpx2.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except (aiohttp.ClientError, OSError) as exc:   # reset or broken after the connection opened
        raise httpx2.ReadError(str(exc) or type(exc).__name__, request=request) from exc


class _Body(httpx2.AsyncByteStream):
    """A response body as aiohttp receives it; closing it before its end closes the connection."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx2.Request) -> None:
        self._response, self._request = response, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()   # back to the pool
        else:
            self._response.close()   # half read: the connection cannot be reused


def transport_for(limits: httpx2.Limits) -> AiohttpTransport | None:
    """The providers' transport, or None (httpx2's own) where the environment names a proxy."""
    if any(scheme in getproxies() for scheme in ("http", "https", "all")):
        return None
    return AiohttpTransport(limits)


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """httpx2's `AsyncBaseTransport` on an aiohttp session (see the module docstring)."""

    def __init__(self, limits: httpx2.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self._limits = limits
        self._ssl = ssl_context if ssl_context is not None else httpx2.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session_here(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            self._abandon()
            connector = aiohttp.TCPConnector(limit=self._limits.max_connections or 0, ssl=self._ssl,
                                             keepalive_timeout=self._limits.keepalive_expiry or 5.0)
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                skip_auto_headers=_NOT_ADDED, trust_env=False, timeout=aiohttp.ClientTimeout(total=None),
                max_field_size=MAX_HEADER_BYTES, max_line_size=MAX_HEADER_BYTES)
            # aiohttp sends an idempotent request (a poll, a download) again by itself when a reused connection
            # drops, even after the server read it, and a failure to connect then would read as "not sent".
            # httpx2 never does; neither does this (a private switch, the one aiohttp's own tests use).
            if hasattr(self._session, "_retry_connection"):
                self._session._retry_connection = False
            self._loop = loop
        return self._session

    def _abandon(self) -> None:
        """A session left behind by an event loop that is gone: its sockets closed without that loop."""
        if self._session is not None and not self._session.closed:
            with contextlib.suppress(Exception):   # aiohttp's own synchronous close (its public one awaits)
                self._session.connector._close()   # type: ignore[union-attr]
        self._session = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        session = self._session_here()
        body = await request.aread()
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw)
        if headers.pop("Transfer-Encoding", None) is not None:   # read whole above: sent with its length
            headers["Content-Length"] = str(len(body))
        t = request.extensions.get("timeout", {})
        pool, connect = t.get("pool"), t.get("connect")
        timeout = aiohttp.ClientTimeout(total=None, sock_read=t.get("read"), sock_connect=connect,
                                        connect=None if pool is None or connect is None else pool + connect)
        url = request.url.copy_with(userinfo=b"") if request.url.userinfo else request.url   # httpx2 sent it as
        with _as_httpx(request):                                              # Authorization; aiohttp refuses both
            response = await session.request(request.method, URL(str(url), encoded=True), data=body or None,
                                             headers=headers, allow_redirects=False, timeout=timeout,
                                             compress=None, proxy=None)
        return httpx2.Response(response.status, headers=list(response.raw_headers),
                               stream=_Body(response, request),
                               extensions={"http_version": b"HTTP/1.1",
                                           "reason_phrase": (response.reason or "").encode("ascii", "replace")})

    async def aclose(self) -> None:
        if self._session is not None and self._loop is asyncio.get_running_loop():
            await self._session.close()
            self._session = None
        self._abandon()
