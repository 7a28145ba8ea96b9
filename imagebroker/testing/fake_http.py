"""A minimal HTTP image API and its provider, for testing the broker over real loopback HTTP.

The protocol: `POST {base_url}/v1/generate` with JSON `{"model", "prompt", "n", "width", "height",
"seed"}` and `Authorization: Bearer KEY`; the answer is `{"id", "images": [base64...],
"usage": {"images": n}}`. `FakeImageServer` speaks it on 127.0.0.1 and follows a script: one step per
request (`ok`, `empty`, `broken`, `malformed`, `status:CODE[:RETRY_AFTER]`, `sleep:SECONDS`,
`reset`), the last step repeating.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from ..errors import BadProviderResponse, ProviderUnavailable
from ..providers.base import CallContext, Provider, ProviderResult, RawImage
from ..providers.http import status_error
from ..providers.offering import Offering
from ..types import ImageRequest
from .images import make_image


class FakeHTTPProvider(Provider):
    name = "fakehttp"
    api_key_env = "FAKEHTTP_API_KEY"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            self._client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0, connect=5.0))
        return self._client

    async def generate(self, request: ImageRequest, offering: Offering,
                       ctx: CallContext) -> ProviderResult:
        where = {"provider": self.name, "offering": offering.id}
        w, h = (request.width, request.height) if request.width else (512, 512)
        body = {"model": offering.model, "prompt": request.prompt, "n": request.n, "width": w,
                "height": h, "seed": request.seed}
        url = f"{self.base_url_for(offering)}/v1/generate"
        try:
            resp = await self.client().post(url, json=body,
                                            headers={"Authorization": f"Bearer {ctx.api_key}"},
                                            timeout=ctx.timeout_s)
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(f"timeout: {type(exc).__name__}", **where) from None
        except httpx.TransportError as exc:
            raise ProviderUnavailable(f"connection failed: {type(exc).__name__}", **where) from None
        if resp.status_code != 200:
            raise status_error(resp.status_code, resp.text, resp.headers, **where)
        try:
            data = resp.json()
            images = [RawImage(base64.b64decode(b), (request.seed + i) if request.seed is not None else None)
                      for i, b in enumerate(data["images"])]
        except (ValueError, KeyError, TypeError) as exc:
            raise BadProviderResponse(f"malformed response: {type(exc).__name__}", **where) from None
        return ProviderResult(images, data.get("usage", {}), data.get("id"),
                              {"model": offering.model, "size": f"{w}x{h}", "n": request.n})

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class FakeImageServer:
    """The fake API on 127.0.0.1:PORT, in a thread. Use as a context manager; `.url`, `.requests`."""

    def __init__(self, script: list[str] | None = None, port: int = 0) -> None:
        self.script = list(script or ["ok"])
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                payload = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append({"body": payload, "auth": self.headers.get("authorization")})
                    step = server.script[min(len(server.requests), len(server.script)) - 1]
                server._answer(self, step, payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _answer(self, h: BaseHTTPRequestHandler, step: str, payload: dict[str, Any]) -> None:
        kind, _, arg = step.partition(":")
        if kind == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            h.connection.close()
            return
        if kind == "sleep":
            time.sleep(float(arg))
        if kind == "status":
            code, _, retry_after = arg.partition(":")
            body = json.dumps({"error": {"message": f"scripted {code}"}}).encode()
            self._send(h, int(code), body, {"Retry-After": retry_after} if retry_after else {})
            return
        if kind == "malformed":
            self._send(h, 200, b"{not json", {})
            return
        n = int(payload.get("n", 1))
        w, hh = int(payload.get("width", 64)), int(payload.get("height", 64))
        seed = payload.get("seed")
        images = [make_image(w, hh, seed=None if seed is None else seed + i, prompt=payload.get("prompt", ""))
                  for i in range(n)]
        if kind == "empty":
            images = []
        elif kind == "broken":
            images = [b"\x89PNG but not really" for _ in images]
        body = json.dumps({"id": f"fake-{len(self.requests)}", "images": [
            base64.b64encode(i).decode() for i in images], "usage": {"images": len(images)}}).encode()
        self._send(h, 200, body, {})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: bytes, headers: dict[str, str]) -> None:
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def __enter__(self) -> FakeImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (for connection-refused tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
