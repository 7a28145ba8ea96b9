"""Black Forest Labs: POST /v1/{model} with `x-key`, then poll the returned `polling_url` and download
`result.sample` at once (it expires in ten minutes). The EU and US hosts pin processing regions."""

from __future__ import annotations

import base64
from typing import Any

from ..errors import BadProviderResponse, ContentRejected, ModelNotFound, ProviderUnavailable
from ..inputs import white_mask
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage
from .http import HttpProvider
from .offering import Offering, request_size

MODERATED = ("Request Moderated", "Content Moderated")


class BFLProvider(HttpProvider):
    name = "bfl"
    api_key_env = "BFL_API_KEY"
    default_base_url = "https://api.bfl.ai"
    # the global and regional hosts answer with a polling_url on the cluster that took the job ("always
    # use the returned polling_url", docs.bfl.ai/integration_guidelines): BFL's own hosts get the key
    key_hosts = ("*.bfl.ai",)

    def headers(self, key: str | None) -> dict[str, str]:
        return {"x-key": key} if key else {}

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where = {"provider": self.name, "offering": offering.id}
        w, h = request_size(request, offering)
        body: dict[str, Any] = {"prompt": request.prompt, "width": w, "height": h,
                                "output_format": "png" if request.output_format == "png" else "jpeg"}
        body |= edit_fields(request)
        edit = offering.capabilities.edit
        if request.is_edit and edit is not None and edit.output_size != "asked":
            del body["width"], body["height"]   # Kontext and Fill take the size from the input
        if request.control:   # Canny/Depth [pro]: our control image as is, the size from it
            control = request.control[0]
            body["preprocessed_image"] = control.image.b64()
            del body["width"], body["height"]   # request_size is already the control image's
        if request.seed is not None:
            body["seed"] = request.seed
        if offering.capabilities.steps and request.steps:
            body["steps"] = request.steps
        if offering.capabilities.guidance and request.guidance_scale is not None:
            body["guidance"] = request.guidance_scale
        body.update(request.extra.get(self.name, {}))
        path = str(offering.settings.get("endpoint", offering.model))
        headers, base = self.headers(ctx.api_key), self.base_url_for(offering)
        resp = await self.send("POST", f"{base}/v1/{path}", where=where, json=body, headers=headers,
                               timeout=ctx.timeout_s)
        task = self.json(resp, where)
        if "polling_url" not in task:
            raise BadProviderResponse("submit answered without a polling_url", **where)
        where["request_id"] = task.get("id")
        polling_url = self.keyed_url(task["polling_url"], base, where)
        interval = self.settings.poll_interval_s or 0.5

        async def check() -> dict[str, Any] | None:
            r = await self.send("GET", polling_url, where=where, headers=headers)
            result = self.json(r, where)
            status = result.get("status")
            if status == "Ready":
                return result
            if status in MODERATED:
                raise ContentRejected(f"BFL: {status}", **where)
            if status == "Task not found":
                raise ModelNotFound("BFL: task not found (expired or unknown id)", **where)
            if status in ("Error", "Failed"):
                raise ProviderUnavailable(f"BFL: {result.get('error') or status}", **where)
            return None

        result = await self.poll(check, interval=interval, deadline_s=ctx.timeout_s, where=where)
        sample = (result.get("result") or {}).get("sample")
        if not sample:
            raise BadProviderResponse("Ready without result.sample", **where)
        image = await self.download(sample, where, base_url=base)
        usage: dict[str, Any] = {"images": 1, "width": w, "height": h}
        if request.is_edit:
            usage["input_sizes"] = [[i.width, i.height] for i in request.images]
        if task.get("cost") is not None:  # newer responses may report credits (not verified)
            usage["credits"] = task["cost"]
        seed = (result.get("result") or {}).get("seed", request.seed)
        applied = {k: (f"<{len(v)} base64 chars>" if k.startswith(("input_image", "image", "mask", "preprocessed"))
                       else v)
                   for k, v in body.items() if k != "prompt"}
        return ProviderResult([RawImage(image, seed)], usage, task.get("id"), {"endpoint": path, **applied})


def edit_fields(request: ImageRequest) -> dict[str, Any]:
    """An edit's fields, base64 in the body: FLUX Fill's `image` and `mask` (white = fill), else the
    images as `input_image`, `input_image_2`, ... (FLUX.2, Kontext)."""
    if request.mask is not None:
        return {"image": request.images[0].b64(), "mask": base64.b64encode(white_mask(request.mask)).decode()}
    return {("input_image" if i == 0 else f"input_image_{i + 1}"): img.b64() for i, img in enumerate(request.images)}
