"""Luma (Photon): `POST /dream-machine/v1/generations/image` answers 201 with a generation in state
`queued`; `GET .../generations/{id}` is polled through `dreaming` to `completed` (`assets.image`, a URL
fetched at once) or `failed` (`failure_reason`). Moderation happens after submission, as a failed
generation, and failed generations are refunded (Luma's docs), so a failure is recorded at no cost. The
size is asked as `aspect_ratio`; one image per call, no seed. Reference and modify images must be URLs
Luma can fetch, so edits are not offered here. Errors carry `detail`."""

from __future__ import annotations

from typing import Any

from ..errors import BadProviderResponse, ContentRejected, ProviderUnavailable
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage, mark_submitted, report_usage
from .http import HttpProvider
from .offering import Offering, request_size

# the catalog's sizes -> aspect_ratio; pixel sizes from Luma's reframe docs (not verified for generation)
SIZES = {"1536x1536": "1:1", "1792x1344": "4:3", "1344x1792": "3:4", "2048x1152": "16:9", "1152x2048": "9:16",
         "2432x1024": "21:9", "1024x2432": "9:21"}
MODERATION = ("moderation", "blacklisted")


class LumaProvider(HttpProvider):
    name = "luma"
    api_key_env = "LUMAAI_API_KEY"
    default_base_url = "https://api.lumalabs.ai/dream-machine/v1"

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where: dict[str, Any] = {"provider": self.name, "offering": offering.id}
        w, h = request_size(request, offering)
        body: dict[str, Any] = {"prompt": request.prompt, "model": offering.model,
                                "aspect_ratio": SIZES[f"{w}x{h}"], "format": "png"}
        body.update(request.extra.get(self.name, {}))
        base, headers = self.base_url_for(offering), self.headers(ctx.api_key)
        resp = await self.send("POST", f"{base}/generations/image", where=where, json=body, headers=headers,
                               timeout=ctx.timeout_s)
        generation = self.json(resp, where)
        gen_id = generation.get("id") if isinstance(generation, dict) else None
        if not gen_id:
            raise BadProviderResponse("generations/image answered without an id", **where)
        where["request_id"] = gen_id
        mark_submitted(str(gen_id))

        async def check() -> dict[str, Any] | None:
            g = self.json(await self.send("GET", f"{base}/generations/{gen_id}", where=where, headers=headers),
                          where)
            state = g.get("state") if isinstance(g, dict) else None
            if state == "completed":
                return g
            if state == "failed":
                report_usage({"images": 0, "width": w, "height": h})   # refunded
                why = str(g.get("failure_reason") or "no reason given")[:200]
                if any(word in why.lower() for word in MODERATION):
                    raise ContentRejected(f"Luma refused: {why}", **where)
                raise ProviderUnavailable(f"Luma generation failed: {why}", **where)
            return None

        done = await self.poll(check, interval=self.settings.poll_interval_s or 1.0, deadline_s=ctx.timeout_s,
                               where=where)
        url = (done.get("assets") or {}).get("image")
        if not url:
            raise BadProviderResponse("completed without assets.image", **where)
        image = await self.download(url, where, base_url=base)
        applied = {k: v for k, v in body.items() if k != "prompt"} | {"served_by": done.get("model")}
        return ProviderResult([RawImage(image, None)], {"images": 1, "width": w, "height": h}, gen_id, applied)
