"""Recraft: OpenAI-shaped `POST /v1/images/generations` (JSON), edits as multipart `/v1/images/imageToImage`
(image, prompt, strength) and `/v1/images/inpaint` (image, mask, prompt; V3 models only). Every answer says
what it cost in API units (`credits`, 1,000 to the dollar), which settles the call. Error bodies are plain
text or JSON (a bad token is a text/plain 401 "request unauthorized")."""

from __future__ import annotations

from typing import Any

from ..inputs import white_mask
from ..types import ImageRequest
from .base import RawImage
from .images_api import ImagesApiProvider
from .offering import Offering


class RecraftProvider(ImagesApiProvider):
    name = "recraft"
    api_key_env = "RECRAFT_API_TOKEN"
    default_base_url = "https://external.api.recraft.ai/v1"

    def url(self, request: ImageRequest, offering: Offering) -> str:
        path = "images/generations"
        if request.is_edit:
            path = "images/inpaint" if request.mask is not None else "images/imageToImage"
        return f"{self.base_url_for(offering)}/{path}"

    def body(self, request: ImageRequest, offering: Offering, size: tuple[int, int]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": offering.model, "prompt": request.prompt, "n": request.n,
                                "response_format": "b64_json"}
        if not request.is_edit:
            body["size"] = f"{size[0]}x{size[1]}"
        elif request.mask is None:   # imageToImage needs a strength; 0.5 is the middle of its 0..1
            body["strength"] = 0.5 if request.strength is None else request.strength
        if request.seed is not None:
            body["random_seed"] = request.seed
        if request.negative_prompt and offering.capabilities.negative_prompt:
            body["negative_prompt"] = request.negative_prompt
        return body

    def send_kwargs(self, body: dict[str, Any], request: ImageRequest) -> dict[str, Any]:
        if not request.is_edit:
            return {"json": body}
        init = request.images[0]
        files = [("image", (f"image.{init.format}", init.data, init.mime))]
        if request.mask is not None:
            files.append(("mask", ("mask.png", white_mask(request.mask), "image/png")))
        return {"data": {k: str(v) for k, v in body.items()}, "files": files}

    def usage(self, data: dict[str, Any], images: list[RawImage], size: tuple[int, int]) -> dict[str, Any]:
        usage = super().usage(data, images, size)
        if data.get("credits") is not None:
            usage["credits"] = data["credits"]
        return usage
