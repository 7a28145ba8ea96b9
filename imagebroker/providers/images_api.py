"""What the providers whose API is shaped like OpenAI's Images API share (xAI, Recraft, BytePlus ModelArk,
Azure OpenAI): one JSON POST to `.../images/generations`, an answer whose `data[]` holds `b64_json` or a
`url` to fetch at once (they expire), and an error body read by the provider's own rules. Each provider
says how its body is built, where it is sent, and what its answer bills; the loop is here once."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import httpx2

from ..errors import BadProviderResponse, ContentRejected, ProviderError
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage
from .http import HttpProvider, status_error
from .offering import Offering, request_size


class ImagesApiProvider(HttpProvider):
    """Subclasses implement `body` and may override `url`, `usage`, `error` and `refusal`."""

    def url(self, request: ImageRequest, offering: Offering) -> str:
        path = "images/edits" if request.is_edit else "images/generations"
        return f"{self.base_url_for(offering)}/{path}"

    def body(self, request: ImageRequest, offering: Offering, size: tuple[int, int]) -> dict[str, Any]:
        raise NotImplementedError

    def send_kwargs(self, body: dict[str, Any], request: ImageRequest) -> dict[str, Any]:
        """How the body goes on the wire: JSON (a multipart provider overrides this)."""
        return {"json": body}

    def usage(self, data: dict[str, Any], images: list[RawImage], size: tuple[int, int]) -> dict[str, Any]:
        return {"images": len(images), "width": size[0], "height": size[1]}

    def error(self, resp: httpx2.Response, where: dict[str, Any]) -> ProviderError:
        """An error answer as an imagebroker error (a provider reads its own error codes first)."""
        return status_error(resp.status_code, resp.text, resp.headers, **where)

    def refusal(self, data: dict[str, Any]) -> str | None:
        """Why a 200 answer is a moderation refusal, or None."""
        return None

    def applied(self, body: dict[str, Any], request: ImageRequest) -> dict[str, Any]:
        """What the call sent, as `applied` reports it (input images as their lengths, never their bytes)."""
        return {k: _shown(k, v) for k, v in body.items() if k != "prompt"}

    async def post(self, url: str, *, where: dict[str, Any], ctx: CallContext, body: dict[str, Any],
                   request: ImageRequest) -> tuple[dict[str, Any], str | None]:
        """The answer's JSON object and the request id its headers carry (a streaming provider overrides
        this to read events into the same shape)."""
        resp = await self.send("POST", url, where=where, accept=(400, 401, 403, 404, 422),
                               headers=self.headers(ctx.api_key), timeout=ctx.timeout_s,
                               **self.send_kwargs(body, request))
        if resp.status_code >= 400:
            raise self.error(resp, where)
        data = self.json(resp, where)
        if not isinstance(data, dict):
            raise BadProviderResponse("answer is not a JSON object", **where)
        return data, resp.headers.get("x-request-id")

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where: dict[str, Any] = {"provider": self.name, "offering": offering.id}
        size = request_size(request, offering)
        body = self.body(request, offering, size)
        body.update(request.extra.get(self.name, {}))
        base = self.base_url_for(offering)
        data, request_id = await self.post(self.url(request, offering), where=where, ctx=ctx, body=body,
                                           request=request)
        if (why := self.refusal(data)) is not None:
            raise ContentRejected(why, **where)
        images = await self.read_images(data.get("data"), request, base, where)
        return ProviderResult(images, self.usage(data, images, size), data.get("id") or request_id,
                              self.applied(body, request))

    async def read_images(self, items: Any, request: ImageRequest, base: str | None,
                          where: dict[str, Any]) -> list[RawImage]:
        """`data[]`'s images: `b64_json` decoded (a `data:` prefix tolerated, as xAI's older answers carry
        one), else `url` fetched at once by the download rules."""
        if not isinstance(items, list):
            raise BadProviderResponse("answer without a `data` list", **where)
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise BadProviderResponse("`data` item that is not an object", **where)
            seed = None if request.seed is None else request.seed + i
            if item.get("b64_json"):
                payload = str(item["b64_json"])
                payload = payload.partition(",")[2] if payload.startswith("data:") else payload
                try:
                    out.append(RawImage(base64.b64decode(payload, validate=True), seed))
                except (binascii.Error, ValueError):
                    raise BadProviderResponse("undecodable b64_json", **where) from None
            elif item.get("url"):
                out.append(RawImage(await self.download(item["url"], where, base_url=base), seed))
        return out


def _shown(key: str, value: Any) -> Any:
    """A body field as `applied` reports it: an input image as its length, never its bytes."""
    if isinstance(value, str) and value.startswith("data:"):
        return f"<data: URI, {len(value)} chars>"
    if isinstance(value, list) and value and all(isinstance(v, str) and v.startswith("data:") for v in value):
        return [f"<data: URI, {len(v)} chars>" for v in value]
    if isinstance(value, (bytes, tuple)):
        return "<file>"
    return value
