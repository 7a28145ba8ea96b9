"""A minimal HTTP image API and its provider, for testing the broker over real loopback HTTP.

The protocol: `POST {base_url}/v1/generate` with JSON `{"model", "prompt", "n", "width", "height",
"seed"}` and `Authorization: Bearer KEY`; the answer is `{"id", "images": [base64...],
"usage": {"images": n}}`. `FakeImageServer` speaks it on 127.0.0.1 and follows a script, one step per
request, the last step repeating.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from typing import Any

import httpx2

from ..errors import BadProviderResponse, ProviderUnavailable
from ..providers.base import CallContext, Provider, ProviderResult, RawImage
from ..providers.http import status_error
from ..providers.offering import Offering
from ..types import ImageRequest
from .fakes import FakeServer, Reply


class FakeHTTPProvider(Provider):
    name = "fakehttp"
    api_key_env = "FAKEHTTP_API_KEY"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._client: httpx2.AsyncClient | None = None

    def client(self) -> httpx2.AsyncClient:
        if self._client is None:
            limits = httpx2.Limits(max_connections=200, max_keepalive_connections=200)
            self._client = httpx2.AsyncClient(limits=limits, timeout=httpx2.Timeout(60.0, connect=5.0))
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
        except httpx2.TimeoutException as exc:
            raise ProviderUnavailable(f"timeout: {type(exc).__name__}", **where) from None
        except httpx2.TransportError as exc:
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


class FakeImageServer(FakeServer):
    """The fake API on 127.0.0.1:PORT. Besides the common steps (see `imagebroker.testing.fakes`) it
    takes `status:CODE[:RETRY_AFTER]`, `sleep:SECONDS` and `reset` (the connection is dropped)."""

    name = "fakehttp"

    def authorised(self, req: dict[str, Any]) -> bool:
        return True  # any key: tests read what was sent from `requests`

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        kind, _, arg = step.partition(":")
        if kind == "reset":
            raise ConnectionAbortedError  # the handler drops the connection without an answer
        if kind == "sleep":
            time.sleep(float(arg))
        if kind == "status":
            code, _, retry_after = arg.partition(":")
            return Reply(int(code), self.error_body(f"scripted {code}"),
                         {"Retry-After": retry_after} if retry_after else {})
        payload = json.loads(req["body"] or b"{}")
        n, seed = int(payload.get("n", 1)), payload.get("seed")
        images = self.images(kind, n, int(payload.get("width", 64)), int(payload.get("height", 64)), seed)
        return Reply(200, {"id": f"fake-{self.generations}", "usage": {"images": len(images)},
                           "images": [base64.b64encode(i).decode() for i in images]})


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (for connection-refused tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
