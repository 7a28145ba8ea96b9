"""Together AI: POST /v1/images/generations (FLUX), base64 results, LoRAs through `image_loras`, Kontext
edits through `image_url`.
Billed per megapixel; the response carries no usage, so the units are the images returned."""

from __future__ import annotations

import base64

from ..errors import BadProviderResponse
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage, sampling_fields
from .http import HttpProvider
from .offering import Offering, request_size


class TogetherProvider(HttpProvider):
    name = "together"
    api_key_env = "TOGETHER_API_KEY"
    default_base_url = "https://api.together.xyz/v1"  # background knowledge, not verified

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where = {"provider": self.name, "offering": offering.id}
        w, h = request_size(request, offering)
        body: dict = {"model": offering.model, "prompt": request.prompt, "width": w, "height": h,
                      "n": request.n, "response_format": "base64",
                      "output_format": "png" if request.output_format == "png" else "jpeg"}
        body |= sampling_fields(request, offering, steps="steps", guidance="guidance_scale")
        if request.adapters:
            body["image_loras"] = [{"path": a.ref, "scale": a.scale} for a in request.adapters]
        if request.is_edit:   # FLUX Kontext: `image_url` (a data: URI here; Together documents URLs)
            body["image_url"] = request.images[0].data_url()
        body.update(request.extra.get(self.name, {}))
        base = self.base_url_for(offering)
        resp = await self.send("POST", f"{base}/images/generations", where=where, json=body,
                               headers=self.headers(ctx.api_key), timeout=ctx.timeout_s)
        data = self.json(resp, where)
        try:
            items = data["data"]
            images = [RawImage(base64.b64decode(d["b64_json"]) if d.get("b64_json") else
                               await self.download(d["url"], where, base_url=base),
                               None if request.seed is None else request.seed + i)
                      for i, d in enumerate(items)]
        except (KeyError, TypeError, ValueError) as exc:
            raise BadProviderResponse(f"unexpected response shape: {exc!r}", **where) from None
        sent = {k: "<data: URI>" if k == "image_url" else v for k, v in body.items() if k != "prompt"}
        return ProviderResult(images, {"images": len(images), "width": w, "height": h},
                              data.get("id"), {"prompt": request.prompt, **sent})
