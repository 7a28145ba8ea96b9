"""OpenAI Images API over httpx2 (the shared Images-API loop): `POST /images/generations` (JSON) and
`POST /images/edits` (multipart: repeated `image[]` file parts, a mask whose transparent pixels are changed).
Token-billed: `usage` settles the cost. Data residency: a pinned region uses the regional host
(`providers.openai.region: eu`), which also makes the offering's regions [eu]. `stream: true` with
`partial_images` is read as OpenAI's server-sent events: each preview to the caller's progress callback, then
the completed event's image and usage.

It speaks HTTP itself rather than through the `openai` SDK: the SDK's request building and response models
cost ~0.9 ms of client CPU per call on the benchmark machine (docs/benchmarks.md), more than the rest of the
broker's own overhead. What the SDK adds for images is kept: the `OpenAI-Organization` and `OpenAI-Project`
headers (`OPENAI_ORG_ID` / `OPENAI_PROJECT_ID`, or `options.organization` / `options.project`), the request
id, and the mapping of its error statuses (shared with every HTTP provider)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from ..errors import BadProviderResponse
from ..inputs import alpha_mask
from ..types import ImageRequest, PartialImage
from .base import CallContext, ProviderResult, RawImage, mark_submitted
from .http import transport_errors
from .images_api import ImagesApiProvider
from .offering import Offering

_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}


class OpenAIProvider(ImagesApiProvider):
    name = "openai"
    api_key_env = "OPENAI_API_KEY"
    default_base_url = "https://api.openai.com/v1"

    def headers(self, key: str | None) -> dict[str, str]:
        out = super().headers(key)
        for header, option, env in (("OpenAI-Organization", "organization", "OPENAI_ORG_ID"),
                                    ("OpenAI-Project", "project", "OPENAI_PROJECT_ID")):
            if value := self.settings.options.get(option) or os.environ.get(env):
                out[header] = str(value)
        return out

    def body(self, request: ImageRequest, offering: Offering, size: tuple[int, int]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": offering.model, "prompt": request.prompt, "n": request.n,
                                "size": f"{size[0]}x{size[1]}", "output_format": request.output_format or "png"}
        if request.quality:
            body["quality"] = request.quality
        if request.background:
            body["background"] = request.background
        if offering.model.startswith("dall-e"):
            body["response_format"] = "b64_json"
            body.pop("output_format")
        if (previews := self.previews(request, offering)):   # one image streamed: its previews, then it
            body |= {"stream": True, "partial_images": previews}
        return body

    @staticmethod
    def previews(request: ImageRequest, offering: Offering) -> int:
        return min(request.partial_images, offering.capabilities.partial_images) if request.n == 1 else 0

    def send_kwargs(self, body: dict[str, Any], request: ImageRequest) -> dict[str, Any]:
        """JSON for a generation; for an edit, multipart: every input image a named, typed `image[]` part (a
        part sent as application/octet-stream is refused), the mask made OpenAI's way, no `moderation`."""
        if not request.is_edit:
            return {"json": body}
        files = [("image[]", (f"image-{i}.{_EXT[img.format]}", img.data, img.mime))
                 for i, img in enumerate(request.images)]
        if request.mask is not None:
            files.append(("mask", ("mask.png", alpha_mask(request.mask), "image/png")))
        fields = {k: json.dumps(v) if isinstance(v, bool) else str(v) for k, v in body.items() if k != "moderation"}
        return {"data": fields, "files": files}

    def applied(self, body: dict[str, Any], request: ImageRequest) -> dict[str, Any]:
        out = super().applied(body, request)
        if request.is_edit:
            out.pop("moderation", None)
            out |= {"images": len(request.images), "mask": request.mask is not None}
        return out

    def usage(self, data: dict[str, Any], images: list[RawImage], size: tuple[int, int]) -> dict[str, Any]:
        usage = super().usage(data, images, size)
        usage["quality"] = data.get("quality")
        u = data.get("usage")
        if isinstance(u, dict):
            inp, out = u.get("input_tokens_details") or {}, u.get("output_tokens_details") or {}
            usage |= {"input_text_tokens": inp.get("text_tokens", u.get("input_tokens", 0)),
                      "input_image_tokens": inp.get("image_tokens", 0),
                      "output_image_tokens": out.get("image_tokens", u.get("output_tokens", 0)),
                      "output_text_tokens": out.get("text_tokens", 0) or 0}
        return usage

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        result = await super().generate(request, offering, ctx)
        if result.usage.get("quality") is None:
            result.usage["quality"] = request.quality
        return result

    async def post(self, url: str, *, where: dict[str, Any], ctx: CallContext, body: dict[str, Any],
                   request: ImageRequest) -> tuple[dict[str, Any], str | None]:
        if not body.get("stream"):
            return await super().post(url, where=where, ctx=ctx, body=body, request=request)
        return await self._streamed(url, where, ctx, body, request)

    async def _streamed(self, url: str, where: dict[str, Any], ctx: CallContext, body: dict[str, Any],
                        request: ImageRequest) -> tuple[dict[str, Any], str | None]:
        """The SSE stream (`image_generation.*` or `image_edit.*` events): each preview to `ctx.partial`, then
        the completed event, as the answer a plain call gives (`data[]` with its image, and the usage)."""
        mark_submitted()
        done, read, offering = None, 0, where["offering"]
        with transport_errors(where, submit=True):
            async with self.client().stream("POST", url, headers=self.headers(ctx.api_key), timeout=ctx.timeout_s,
                                            **self.send_kwargs(body, request)) as resp:
                if resp.status_code >= 300:
                    await self._read(resp, where)   # raises the mapped error (or the redirect refusal)
                    raise BadProviderResponse(f"HTTP {resp.status_code} opening the stream", **where)
                async for line in resp.aiter_lines():
                    read += len(line)
                    if read > self.max_bytes:
                        raise BadProviderResponse("stream larger than the answer limit", **where)
                    if not line.startswith("data:"):
                        continue
                    try:
                        event = json.loads(line[5:])
                    except ValueError:
                        raise BadProviderResponse("malformed JSON in the event stream", **where) from None
                    kind = str(event.get("type", "")) if isinstance(event, dict) else ""
                    if kind.endswith(".partial_image") and ctx.partial is not None:
                        ctx.partial(PartialImage(index=int(event.get("partial_image_index", 0)) + 1,
                                                 total=body["partial_images"], data=_b64(event, where),
                                                 format=event.get("output_format"), offering=offering))
                    elif kind.endswith(".completed"):
                        done = event
                request_id = resp.headers.get("x-request-id")
        if done is None:
            raise BadProviderResponse("the stream ended without its completed event", **where)
        return {"data": [{"b64_json": done.get("b64_json")}], "usage": done.get("usage"),
                "quality": done.get("quality")}, request_id


def _b64(event: dict[str, Any], where: dict[str, Any]) -> bytes:
    try:
        return base64.b64decode(str(event.get("b64_json") or ""), validate=True)
    except (binascii.Error, ValueError):
        raise BadProviderResponse("undecodable b64_json in a preview", **where) from None

