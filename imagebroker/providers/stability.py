"""Stability AI REST v2beta: multipart POST to /v2beta/stable-image/generate/{ultra,core,sd3}, and for edits
sd3's `mode=image-to-image` (image + strength, no aspect_ratio) and /v2beta/stable-image/edit/inpaint (image +
mask, white = change); /v2beta/stable-image/control/{sketch,structure} (a control image + `control_strength`,
the output at its size) and control/style (an image prompt + `fidelity`). A `finish_reason` of
CONTENT_FILTERED is a refusal even on HTTP 200. Billed in credits per image."""

from __future__ import annotations

import base64
from typing import Any

from ..errors import BadProviderResponse, ContentRejected
from ..inputs import white_mask
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage
from .http import HttpProvider
from .offering import Offering, request_size

RATIOS = {"1024x1024": "1:1", "1344x768": "16:9", "1536x640": "21:9", "832x1216": "2:3",
          "1216x832": "3:2", "896x1088": "4:5", "1088x896": "5:4", "768x1344": "9:16", "640x1536": "9:21"}


class StabilityProvider(HttpProvider):
    name = "stability"
    api_key_env = "STABILITY_API_KEY"
    default_base_url = "https://api.stability.ai"

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where = {"provider": self.name, "offering": offering.id}
        w, h = request_size(request, offering)
        endpoint = str(offering.settings.get("endpoint", "core"))
        fields: dict[str, str] = {"prompt": request.prompt, "output_format": request.output_format or "png"}
        files: dict[str, tuple[str, bytes, str]] = {}
        if request.is_edit:   # the output takes the input's size: no aspect_ratio
            init = request.images[0]
            files["image"] = (f"image.{init.format}", init.data, init.mime)
            if request.mask is not None:
                files["mask"] = ("mask.png", white_mask(request.mask), "image/png")
            elif endpoint == "sd3":
                fields |= {"mode": "image-to-image", "strength": str(request.edit_strength)}
        elif request.control:   # control/sketch, control/structure: the output takes the control image's size
            control = request.control[0]
            image = control.sent_image(offering.capabilities.control_input)
            files["image"] = (f"control.{image.format}", image.data, image.mime)
            fields["control_strength"] = str(control.scale)
        else:
            fields["aspect_ratio"] = RATIOS[f"{w}x{h}"]
            if request.image_prompts:   # control/style: the reference, held by `fidelity`
                ref = request.image_prompts[0].image
                files["image"] = (f"style.{ref.format}", ref.data, ref.mime)
                fields["fidelity"] = str(request.image_prompts[0].scale)
        if endpoint == "sd3":
            fields["model"] = offering.model
            if request.guidance_scale is not None:
                fields["cfg_scale"] = str(request.guidance_scale)
        if request.seed is not None:
            fields["seed"] = str(request.seed)
        if request.negative_prompt and offering.capabilities.negative_prompt:
            fields["negative_prompt"] = request.negative_prompt
        fields.update({k: str(v) for k, v in request.extra.get(self.name, {}).items()})
        headers = {**self.headers(ctx.api_key), "Accept": "application/json"}
        path = endpoint if "/" in endpoint else f"generate/{endpoint}"   # edit/inpaint, or generate/sd3
        url = f"{self.base_url_for(offering)}/v2beta/stable-image/{path}"
        parts: dict[str, Any] = {k: (None, v) for k, v in fields.items()} | files
        resp = await self.send("POST", url, where=where, files=parts, headers=headers, timeout=ctx.timeout_s)
        data = self.json(resp, where)
        if data.get("finish_reason") == "CONTENT_FILTERED":
            raise ContentRejected("Stability filtered the output (finish_reason CONTENT_FILTERED)",
                                  status=200, **where)
        try:
            image = base64.b64decode(data["image"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadProviderResponse(f"no image in response: {exc!r}", **where) from None
        seed = data.get("seed", request.seed)
        applied: dict[str, Any] = dict(fields) | {k: f"<{len(v[1])} bytes>" for k, v in files.items()}
        return ProviderResult([RawImage(image, seed)], {"images": 1, "width": w, "height": h},
                              resp.headers.get("x-request-id"), applied)
