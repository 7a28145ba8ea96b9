"""BytePlus ModelArk (Seedream, SeedEdit): OpenAI-shaped `POST /api/v3/images/generations` with a Bearer
`ARK_API_KEY` (keys are bound to one region: the host is the region). There is no `n`: Seedream 4.x decides
how many images a "sequential" call makes, so one image is asked per call and the broker splits larger
`n`. The watermark defaults to on and is turned off unless the request's extras say otherwise. Refusals
are 400s whose code ends in `SensitiveContentDetected`; in a group, one image may fail alone
(`data[i].error`)."""

from __future__ import annotations

from typing import Any

import httpx2

from ..errors import BadProviderResponse, ContentRejected, ProviderError
from ..types import ImageRequest
from .base import RawImage, reported_size, sampling_fields
from .http import status_error
from .images_api import ImagesApiProvider
from .offering import Offering

SENSITIVE = "SensitiveContentDetected"


class BytePlusProvider(ImagesApiProvider):
    name = "byteplus"
    api_key_env = "ARK_API_KEY"
    default_base_url = "https://ark.ap-southeast.bytepluses.com/api/v3"

    def url(self, request: ImageRequest, offering: Offering) -> str:
        return f"{self.base_url_for(offering)}/images/generations"   # edits too: `image` in the body

    def body(self, request: ImageRequest, offering: Offering, size: tuple[int, int]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": offering.model, "prompt": request.prompt, "response_format": "b64_json",
                                "watermark": False}
        edit = offering.capabilities.edit
        body["size"] = "adaptive" if request.is_edit and edit and edit.output_size != "asked" else \
            f"{size[0]}x{size[1]}"
        if request.is_edit:
            refs = [img.data_url() for img in request.images]
            body["image"] = refs[0] if len(refs) == 1 else refs
        if offering.capabilities.seed:   # seed and guidance: Seedream 3.0 and SeedEdit only
            body |= sampling_fields(request, offering, steps="steps", guidance="guidance_scale",
                                    negative_prompt=None)
        return body

    def error(self, resp: httpx2.Response, where: dict[str, Any]) -> ProviderError:
        code = _code(resp)
        if SENSITIVE in code:
            return ContentRejected(f"BytePlus refused: {code}", status=resp.status_code, **where)
        return status_error(resp.status_code, resp.text, resp.headers, **where)

    async def read_images(self, items: Any, request: ImageRequest, base: str | None,
                          where: dict[str, Any]) -> list[RawImage]:
        if isinstance(items, list):
            failed = [i.get("error") for i in items if isinstance(i, dict) and i.get("error")]
            kept = [i for i in items if not (isinstance(i, dict) and i.get("error"))]
            if failed and not kept:
                code = str((failed[0] or {}).get("code", "")) if isinstance(failed[0], dict) else ""
                if SENSITIVE in code:
                    raise ContentRejected(f"BytePlus refused the image: {code}", **where)
                raise BadProviderResponse(f"every image failed: {str(failed[0])[:200]}", **where)
            items = kept
        return await super().read_images(items, request, base, where)

    def usage(self, data: dict[str, Any], images: list[RawImage], size: tuple[int, int]) -> dict[str, Any]:
        usage = super().usage(data, images, size)
        made = (data.get("usage") or {}).get("generated_images")
        if isinstance(made, int) and not isinstance(made, bool):
            usage["images"] = made   # what is billed: images actually generated
        sizes = [reported_size(d.get("size")) for d in data.get("data") or [] if isinstance(d, dict)]
        if sizes and all(sizes):
            usage["width"], usage["height"] = sizes[0]   # type: ignore[misc]
        return usage


def _code(resp: httpx2.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code", "")) if isinstance(error, dict) else ""
