"""What every fake server shares: the HTTP plumbing, the script, and the generic failure steps (the
steps are listed in `imagebroker.testing.fakes`)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
import time
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

from PIL import Image

from ..images import make_huge_png, make_image

GENERIC = ("429", "500", "timeout", "malformed", "badkey")
JUNK = b"\xde\xad\xbe\xef" * (1 << 14)  # what the `junk` step appends to each image


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # socketserver's default backlog of 5 resets connections under load


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode()


def multipart(req: dict[str, Any]) -> list[Part]:
    """The parts of a multipart/form-data request, in order (a real form parser, not a regex)."""
    head = f"Content-Type: {req['headers'].get('content-type', '')}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + req["body"])
    if not message.is_multipart():
        raise ValueError("not a multipart/form-data body")
    parts = []
    for part in message.iter_parts():
        raw_type = part.get("content-type")
        parts.append(Part(str(part.get_param("name", header="content-disposition")),
                          part.get_filename(), str(raw_type) if raw_type else None,
                          part.get_payload(decode=True) or b""))
    return parts


@dataclass(frozen=True)
class Seen:
    """What a fake read of an input image it was sent."""

    format: str
    width: int
    height: int
    mode: str
    sha256: str


def seen_image(data: bytes | str) -> Seen | None:
    """An input image as a fake reads it (bytes, base64 or a data: URI); None when it is not an image."""
    import hashlib

    if isinstance(data, str):
        payload = data.partition(",")[2] if data.startswith("data:") else data
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return Seen(str(image.format).lower(), image.width, image.height, image.mode,
                        hashlib.sha256(data).hexdigest())
    except Exception:
        return None


class Reply:
    def __init__(self, status: int = 200, body: Any = b"", headers: dict[str, str] | None = None,
                 content_type: str = "application/json") -> None:
        self.status = status
        self.body = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        self.headers = {"Content-Type": content_type, **(headers or {})}


class FakeServer:
    """Base of every fake: routing, the script, and the generic failure steps."""

    name: ClassVar[str]
    key: ClassVar[str] = "fake-key-0123456789"
    prefix: ClassVar[str] = ""  # what the provider's base URL adds to the host (Together: /v1)
    unsupported: ClassVar[set[str]] = set()  # steps the protocol has no way to express
    timeout_s = 30.0
    latency_s = 0.0   # how long each generation takes to answer (to see how many a client runs at once)

    def __init__(self, script: list[str] | None = None, port: int = 0) -> None:
        self.script = list(script or ["ok"])
        self.requests: list[dict[str, Any]] = []
        self.generations = 0
        self.in_flight = self.max_in_flight = 0   # generations being answered now, and the most at once
        self.state: dict[str, Any] = {}
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body in one segment: no 40 ms delayed-ACK stalls
            wbufsize = 1 << 16  # flushed once per answer by handle_one_request

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length) if length else b""
                url = urlparse(self.path)
                req = {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                       "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                with fake._lock:
                    fake.requests.append(req)
                try:
                    reply = fake.dispatch(req)
                except ConnectionAbortedError:  # the `reset` step: drop the connection, answer nothing
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                try:
                    self.send_response(reply.status)
                    for k, v in {**reply.headers, "Content-Length": str(len(reply.body))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (the timeout step)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.httpd = _HTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.base_url = self.url + self.prefix  # what a policy's providers.NAME.base_url should be
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def next_step(self) -> str:
        with self._lock:
            self.generations += 1
            return self.script[min(self.generations, len(self.script)) - 1]

    def dispatch(self, req: dict[str, Any]) -> Reply:
        if not self.is_generation(req):
            return self.other(req)
        step = self.next_step()
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            return self._answer(req, step)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, req: dict[str, Any], step: str) -> Reply:
        if not self.authorised(req) or step == "badkey":
            return self.bad_key()
        if step == "429":
            return self.rate_limited()
        if step == "500":
            return Reply(500, self.error_body("internal error"))
        if step == "timeout":
            time.sleep(self.timeout_s)
            return Reply(504, self.error_body("gateway timeout"))
        if step == "malformed":
            return Reply(200, b"{this is not json")
        return self.generate(req, step)

    # -- what each protocol defines -----------------------------------------------------------
    def is_generation(self, req: dict[str, Any]) -> bool:
        return req["method"] == "POST"

    def authorised(self, req: dict[str, Any]) -> bool:
        return req["headers"].get("authorization") == f"Bearer {self.key}"

    def bad_key(self) -> Reply:
        return Reply(401, self.error_body("invalid api key"))

    def rate_limited(self) -> Reply:
        """The `429` step: the protocol's rate-limit answer, with Retry-After: 1."""
        return Reply(429, self.error_body("rate limit exceeded"), {"Retry-After": "1"})

    def error_body(self, message: str) -> Any:
        return {"error": {"message": message}}

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        raise NotImplementedError

    def other(self, req: dict[str, Any]) -> Reply:
        return Reply(404, self.error_body(f"no route {req['path']}"))

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def images(step: str, n: int, w: int, h: int, seed: int | None, fmt: str = "png") -> list[bytes]:
        if step == "empty":
            return []
        if step == "broken":
            return [b"not an image at all"] * n
        if step == "tiny":
            w = h = 8
        if step == "gif":
            fmt = "gif"
        if step == "huge":
            return [make_huge_png(13000, 13000)] * n
        if step == "many":
            return FakeServer.images("ok", 1, w, h, seed, fmt) * 50
        images = [make_image(w, h, seed=None if seed is None else seed + i, fmt=fmt) for i in range(n)]
        return [b + JUNK for b in images] if step == "junk" else images

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
