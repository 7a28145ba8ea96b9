"""OpenAI Images API through the official `openai` SDK (3.x, on httpx2), with the SDK's own retries off:
the broker retries. Token-billed: `usage` settles the cost. Data residency: a pinned region uses the
regional host (`providers.openai.region: eu`), which also makes the offering's regions [eu]."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import httpx

from ..errors import BadProviderResponse, MissingExtra, OutcomeUnknown, ProviderUnavailable
from ..inputs import alpha_mask
from ..types import ImageRequest, PartialImage
from .base import CallContext, Provider, ProviderResult, RawImage, mark_submitted
from .http import NOT_SENT, status_error
from .offering import Offering, request_size

NOT_SENT_NAMES = frozenset(cls.__name__ for cls in NOT_SENT)  # the SDK's httpx2 has classes of these names


class OpenAIProvider(Provider):
    name = "openai"
    api_key_env = "OPENAI_API_KEY"
    default_base_url = "https://api.openai.com/v1"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._clients: dict[tuple[str, str], Any] = {}

    def _client(self, base_url: str, key: str) -> Any:
        if (base_url, key) not in self._clients:
            try:
                from openai import AsyncOpenAI, DefaultAsyncHttpxClient
            except ImportError:
                raise MissingExtra("openai", "openai") from None

            async def sending(request: Any) -> None:  # the request leaves: from here it may be billed
                mark_submitted()

            http = DefaultAsyncHttpxClient(event_hooks={"request": [sending]})
            self._clients[(base_url, key)] = AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0,
                                                         http_client=http)
        return self._clients[(base_url, key)]

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        import openai

        where = {"provider": self.name, "offering": offering.id}
        w, h = request_size(request, offering)
        params: dict[str, Any] = {"model": offering.model, "prompt": request.prompt, "n": request.n,
                                  "size": f"{w}x{h}", "output_format": request.output_format or "png"}
        if request.quality:
            params["quality"] = request.quality
        if request.background:
            params["background"] = request.background
        params.update(request.extra.get(self.name, {}))  # moderation, output_compression, user, ...
        previews = min(request.partial_images, offering.capabilities.partial_images) if request.n == 1 else 0
        if previews:   # one image streamed: its previews as events, then the image with the usage
            params |= {"stream": True, "partial_images": previews}
        client = self._client(self.base_url_for(offering) or "", ctx.api_key or "")
        try:
            if request.is_edit:
                resp = await client.images.edit(**_edit_params(request, params), timeout=ctx.timeout_s)
            else:
                resp = await client.images.generate(**params, timeout=ctx.timeout_s)
            if previews:
                resp = await _streamed(resp, ctx, offering.id, previews)
        except openai.APIStatusError as exc:
            headers = httpx.Headers(list(exc.response.headers.items()))
            raise status_error(exc.status_code, exc.response.text, headers, **where) from None
        except openai.APIConnectionError as exc:  # (APITimeoutError too) before or after the request was sent
            cause = type(exc.__cause__).__name__
            if cause in NOT_SENT_NAMES:
                raise ProviderUnavailable(f"connection failed: {cause}", **where) from None
            raise OutcomeUnknown(f"no answer after sending: {cause}", **where) from None
        except (openai.APIResponseValidationError, ValueError) as exc:  # ValueError: JSON that is not
            raise BadProviderResponse(f"malformed response: {type(exc).__name__}", **where) from None
        except _NoImage:
            raise BadProviderResponse("the stream ended without its completed event", **where) from None
        try:
            images = [RawImage(base64.b64decode(d.b64_json), None) for d in resp.data or []]
        except (TypeError, ValueError) as exc:
            raise BadProviderResponse(f"undecodable b64_json: {exc!r}", **where) from None
        usage: dict[str, Any] = {"images": len(images), "width": w, "height": h,
                                 "quality": getattr(resp, "quality", None) or request.quality}
        if resp.usage is not None:
            u = resp.usage
            inp, out = u.input_tokens_details, getattr(u, "output_tokens_details", None)
            usage |= {"input_text_tokens": inp.text_tokens, "input_image_tokens": inp.image_tokens,
                      "output_image_tokens": out.image_tokens if out else u.output_tokens,
                      "output_text_tokens": getattr(out, "text_tokens", 0) or 0}
        applied = {k: v for k, v in params.items() if k != "prompt"}
        if request.is_edit:
            applied.pop("moderation", None)
            applied |= {"images": len(request.images), "mask": request.mask is not None}
        return ProviderResult(images, usage, getattr(resp, "_request_id", None), applied)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


class _NoImage(Exception):
    pass


@dataclass(frozen=True)
class _Streamed:
    """A streamed call's final event, in the shape of an ImagesResponse."""

    data: list[Any]
    usage: Any
    quality: str | None
    _request_id: str | None


async def _streamed(stream: Any, ctx: CallContext, offering: str, total: int) -> _Streamed:
    """Read the SSE stream (`image_generation.*` or `image_edit.*` events): each preview to `ctx.partial`,
    then the completed event's image and usage."""
    done = None
    async for event in stream:
        kind = getattr(event, "type", "")
        if kind.endswith(".partial_image") and ctx.partial is not None:
            ctx.partial(PartialImage(index=event.partial_image_index + 1, total=total,
                                     data=base64.b64decode(event.b64_json), format=event.output_format,
                                     offering=offering))
        elif kind.endswith(".completed"):
            done = event
    if done is None:
        raise _NoImage
    response = getattr(stream, "response", None)
    return _Streamed([done], done.usage, getattr(done, "quality", None),
                     response.headers.get("x-request-id") if response is not None else None)


def _edit_params(request: ImageRequest, params: dict[str, Any]) -> dict[str, Any]:
    """`images.edit`'s arguments: every input image as a named, typed file (the SDK sends a list as repeated
    `image[]` parts; bare bytes would go as application/octet-stream, which the API refuses), the mask made
    OpenAI's way (transparent = change) and no `moderation` (a generate-only field)."""
    files = [(f"image-{i}.{_EXT[img.format]}", img.data, img.mime) for i, img in enumerate(request.images)]
    out = {k: v for k, v in params.items() if k != "moderation"} | {"image": files}
    if request.mask is not None:
        out["mask"] = ("mask.png", alpha_mask(request.mask), "image/png")
    return out


_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
