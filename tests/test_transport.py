"""The providers' transport (httpx2 on aiohttp, `providers/transport.py`) against raw loopback servers that
misbehave the ways real ones do: what is sent, what is read, and above all whether a failure can have
reached the provider (a `NOT_SENT` error is safe to send elsewhere; any other may have been billed)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import httpx2
import pytest

from imagebroker.errors import BadProviderResponse, OutcomeUnknown, ProviderUnavailable
from imagebroker.providers.http import NOT_SENT, HttpProvider
from imagebroker.providers.settings import ProviderSettings
from imagebroker.providers.transport import AiohttpTransport

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"ok\": true}"


class Raw:
    """A TCP server answering each connection with `handle(conn)`; it counts connections and keeps what it read."""

    def __init__(self, handle: Callable[[socket.socket, Raw], None]) -> None:
        self.handle, self.connections, self.received = handle, 0, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, suppress(OSError):
            self.handle(conn, self)

    def read_request(self, conn: socket.socket) -> bytes | None:
        """One request, head and body (by its Content-Length); None when the client closed."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        self.received.append(head + b"\r\n\r\n" + body)
        return head


@contextmanager
def raw(handle: Callable[[socket.socket, Raw], None]) -> Iterator[Raw]:
    server = Raw(handle)
    try:
        yield server
    finally:
        server.sock.close()


def client(**limits: int) -> httpx2.AsyncClient:
    lim = httpx2.Limits(**limits) if limits else httpx2.Limits(max_connections=10)
    return httpx2.AsyncClient(transport=AiohttpTransport(lim), limits=lim, timeout=httpx2.Timeout(5.0))


def post(url: str, c: httpx2.AsyncClient | None = None, **kw: object) -> httpx2.Response:
    async def go() -> httpx2.Response:
        async with c or client() as cl:
            return await cl.post(url, json={"prompt": "a fox"}, **kw)
    return asyncio.run(go())


def answer_each(reply: bytes) -> Callable[[socket.socket, Raw], None]:
    def handle(conn: socket.socket, server: Raw) -> None:
        while server.read_request(conn) is not None:
            conn.sendall(reply)
    return handle


def test_a_post_arrives_with_httpx2s_headers_once_each_and_its_body_and_the_answer_is_read():
    with raw(answer_each(OK)) as server:
        resp = post(server.url + "/v1/images", headers={"Authorization": "Bearer k"})
    assert resp.status_code == 200 and resp.json() == {"ok": True}
    request = server.received[0]
    head = request.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    names = [line.split(b":")[0] for line in head[1:]]
    assert head[0] == b"post /v1/images http/1.1"
    assert sorted(names) == sorted(set(names))   # no header twice (aiohttp adds none of its own)
    assert b"user-agent" in names and b"authorization: bearer k" in head
    assert request.endswith(b'{"prompt":"a fox"}')


def test_connections_are_kept_and_reused():
    async def two() -> list[int]:
        async with client() as c:
            return [(await c.post(server.url, json={})).status_code for _ in range(3)]
    with raw(answer_each(OK)) as server:
        assert asyncio.run(two()) == [200, 200, 200]
    assert server.connections == 1


def test_a_refused_connection_is_a_connect_error_so_nothing_was_sent():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # bound, never listening: refused
        with pytest.raises(httpx2.ConnectError) as exc:
            post(f"http://127.0.0.1:{port}/")
    assert isinstance(exc.value, NOT_SENT)


def test_a_connection_dropped_after_the_request_may_have_been_sent():
    def drop(conn: socket.socket, server: Raw) -> None:
        server.read_request(conn)   # read it all, answer nothing

    with raw(drop) as server, pytest.raises(httpx2.TransportError) as exc:
        post(server.url)
    assert isinstance(exc.value, httpx2.RemoteProtocolError) and not isinstance(exc.value, NOT_SENT)


def test_a_body_cut_short_is_a_protocol_error_not_a_shorter_answer():
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100

    def short(conn: socket.socket, server: Raw) -> None:
        server.read_request(conn)
        conn.sendall(cut)

    with raw(short) as server, pytest.raises(httpx2.RemoteProtocolError):
        post(server.url)


def test_a_slow_answer_is_a_read_timeout_after_sending():
    def slow(conn: socket.socket, server: Raw) -> None:
        server.read_request(conn)
        time.sleep(2)

    with raw(slow) as server, pytest.raises(httpx2.ReadTimeout) as exc:
        post(server.url, timeout=httpx2.Timeout(5.0, read=0.3))
    assert not isinstance(exc.value, NOT_SENT)


def test_waiting_for_a_pooled_connection_past_the_pool_timeout_is_not_sent():
    def slow(conn: socket.socket, server: Raw) -> None:
        server.read_request(conn)
        time.sleep(1.5)
        conn.sendall(OK)

    async def both() -> list[object]:
        async with client(max_connections=1) as c:
            first = asyncio.create_task(c.post(server.url, json={}))
            await asyncio.sleep(0.2)   # the one connection is taken
            second = c.post(server.url, json={}, timeout=httpx2.Timeout(5.0, pool=0.2, connect=0.2))
            return await asyncio.gather(first, second, return_exceptions=True)

    with raw(slow) as server:
        first, second = asyncio.run(both())
    assert isinstance(first, httpx2.Response) and first.status_code == 200
    assert isinstance(second, httpx2.ConnectTimeout) and isinstance(second, NOT_SENT)
    assert len(server.received) == 1


def test_a_redirect_is_returned_as_it_is_never_followed():
    with raw(answer_each(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n")) as server:
        resp = post(server.url + "/start")
    assert resp.status_code == 302 and resp.headers["location"] == "/elsewhere"
    assert len(server.received) == 1


def test_a_chunked_gzip_answer_is_decoded_by_httpx2():
    body = gzip.compress(b'{"data": [1, 2, 3]}')
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reply = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    with raw(answer_each(reply)) as server:
        assert post(server.url).json() == {"data": [1, 2, 3]}


def test_one_client_serves_two_event_loops_one_after_the_other():
    c = client()

    async def once() -> int:
        return (await c.post(server.url, json={})).status_code

    with raw(answer_each(OK)) as server:
        assert asyncio.run(once()) == 200
        assert asyncio.run(once()) == 200   # the first loop's session is gone with it
        asyncio.run(c.aclose())


class _Plain(HttpProvider):
    name = "plain"

    async def generate(self, *args: object) -> None:   # type: ignore[override]
        raise NotImplementedError


def _send(url: str, **settings: object) -> httpx2.Response:
    provider = _Plain(ProviderSettings(**settings))

    async def go() -> httpx2.Response:
        try:
            return await provider.send("POST", url, where={"provider": "plain"}, json={})
        finally:
            await provider.aclose()
    return asyncio.run(go())


def test_a_compressed_answer_is_bounded_by_what_it_inflates_to():
    bomb = gzip.compress(b"0" * 5_000_000)   # ~5 KB on the wire, 5 MB decoded
    reply = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb)
    with raw(answer_each(reply)) as server, pytest.raises(BadProviderResponse, match="larger than"):
        _send(server.url, max_response_bytes=1_000_000)


def test_an_answer_declared_over_the_limit_is_refused_and_one_within_it_read_whole():
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000
    with raw(answer_each(big)) as server:
        with pytest.raises(BadProviderResponse, match="above"):
            _send(server.url, max_response_bytes=1000)
        assert _send(server.url, max_response_bytes=4000).content == b"x" * 2000


def test_the_provider_says_not_sent_or_unknown_from_the_transports_errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(ProviderUnavailable) as refused:
            _send(f"http://127.0.0.1:{s.getsockname()[1]}/")
    assert not isinstance(refused.value, OutcomeUnknown)

    def drop(conn: socket.socket, server: Raw) -> None:
        server.read_request(conn)

    with raw(drop) as server, pytest.raises(OutcomeUnknown):
        _send(server.url)


def test_a_proxy_named_by_the_environment_is_still_used(monkeypatch):
    def proxy(conn: socket.socket, server: Raw) -> None:
        while server.read_request(conn) is not None:
            conn.sendall(OK)

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with raw(proxy) as server:
        monkeypatch.setenv("HTTP_PROXY", server.url)
        assert _send("http://provider.invalid/v1/images").json() == {"ok": True}
    assert server.received[0].startswith(b"POST http://provider.invalid/v1/images HTTP/1.1")


def test_a_reason_phrase_in_any_encoding_is_read_as_the_answer():
    reply = "HTTP/1.1 200 OK €\r\nContent-Length: 12\r\n\r\n".encode() + b'{"ok": true}'
    with raw(answer_each(reply)) as server:
        assert _send(server.url).json() == {"ok": True}


def test_credentials_in_the_url_go_as_basic_auth():
    with raw(answer_each(OK)) as server:
        assert _send(server.url.replace("http://", "http://user:secret@") + "/prompt").status_code == 200
    head = server.received[0].split(b"\r\n\r\n")[0]
    assert head.startswith(b"POST /prompt HTTP/1.1") and b"Authorization: Basic dXNlcjpzZWNyZXQ=" in head


def test_an_answer_its_content_encoding_cannot_decode_is_a_bad_response():
    reply = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!"
    with raw(answer_each(reply)) as server, pytest.raises(BadProviderResponse, match="could not be decoded"):
        _send(server.url)


def test_a_poll_is_not_sent_again_by_the_transport_when_its_connection_drops():
    def once_then_drop(conn: socket.socket, server: Raw) -> None:
        server.read_request(conn)
        conn.sendall(OK)
        server.read_request(conn)   # the second request, read and left unanswered

    async def two() -> None:
        async with client() as c:
            await c.get(server.url)
            with pytest.raises(httpx2.RemoteProtocolError):
                await c.get(server.url)

    with raw(once_then_drop) as server:
        asyncio.run(two())
    assert len(server.received) == 2   # not three: aiohttp's own retry of an idempotent request is off
