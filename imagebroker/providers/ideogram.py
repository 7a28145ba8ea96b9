"""Ideogram 3.0 and 4.0 (v1 routes): `POST /v1/ideogram-v3/generate` and `/v1/ideogram-v4/generate`, multipart
even without files, with the `Api-Key` header; synchronous. The size goes as `resolution` (one of Ideogram's
fixed values); the rendering speed (which sets the price) is the offering's. Edits: `remix` (an init image
and `image_weight`) for the generate offerings, `edit` (image + mask, black = change) for the edit
offering. An image that fails Ideogram's safety check comes back with `is_image_safe: false` and no URL;
a prompt that fails it is a 422. Result URLs are signed and expire: they are fetched at once."""

from __future__ import annotations

from typing import Any

from ..errors import BadProviderResponse, ContentRejected
from ..inputs import black_mask
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage, report_usage, reported_size
from .http import HttpProvider
from .offering import Offering, request_size


class IdeogramProvider(HttpProvider):
    name = "ideogram"
    api_key_env = "IDEOGRAM_API_KEY"
    default_base_url = "https://api.ideogram.ai"

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Api-Key": key} if key else {}

    def form(self, request: ImageRequest, offering: Offering, size: tuple[int, int]) -> tuple[str, dict[str, Any]]:
        """(route, fields) for this request: generate, remix (an init image) or edit (a mask)."""
        version = str(offering.settings.get("version", "ideogram-v3"))
        route = "edit" if request.mask is not None else "remix" if request.is_edit else "generate"
        fields: dict[str, Any] = {("text_prompt" if version == "ideogram-v4" and route == "generate"
                                   else "prompt"): request.prompt,
                                  "num_images": request.n,
                                  "rendering_speed": offering.settings.get("rendering_speed", "DEFAULT")}
        if route != "edit":
            fields["resolution"] = f"{size[0]}x{size[1]}"
        if route == "remix":   # how much of the init image is kept: strength 0.7 keeps 30 of 100
            fields["image_weight"] = round(100 * (1 - (0.5 if request.strength is None else request.strength))) or 1
        if request.seed is not None:
            fields["seed"] = request.seed
        if request.negative_prompt and offering.capabilities.negative_prompt and route != "edit":
            fields["negative_prompt"] = request.negative_prompt
        fields.update(request.extra.get(self.name, {}))
        return f"/v1/{version}/{route}", fields

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where: dict[str, Any] = {"provider": self.name, "offering": offering.id}
        size = request_size(request, offering)
        path, fields = self.form(request, offering, size)
        parts: list[tuple[str, tuple[str | None, Any, str | None]]] = [
            (k, (None, str(v), None)) for k, v in fields.items()]
        if request.is_edit:
            init = request.images[0]
            parts.append(("image", (f"image.{init.format}", init.data, init.mime)))
        if request.mask is not None:
            parts.append(("mask", ("mask.png", black_mask(request.mask), "image/png")))
        base = self.base_url_for(offering)
        resp = await self.send("POST", f"{base}{path}", where=where, files=parts,
                               headers=self.headers(ctx.api_key), timeout=ctx.timeout_s)
        data = self.json(resp, where)
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise BadProviderResponse("answer without a `data` list", **where)
        safe = [i for i in items if i.get("is_image_safe", True) and i.get("url")]
        if len(safe) < len(items):   # a refusal is the call's answer (never routed around), and it is counted
            # as billed in full: whether Ideogram bills refused images is not documented
            report_usage({"images": len(items), "width": size[0], "height": size[1]})
            raise ContentRejected(f"Ideogram's safety check refused {len(items) - len(safe)} of {len(items)} "
                                  "image(s)", **where)
        images = [RawImage(await self.download(i["url"], where, base_url=base), i.get("seed")) for i in safe]
        w, h = reported_size(safe[0].get("resolution") if safe else None) or size
        usage = {"images": len(items), "width": w, "height": h}
        applied = {k: v for k, v in fields.items() if k not in ("prompt", "text_prompt")} | {"route": path}
        return ProviderResult(images, usage, None, applied)

