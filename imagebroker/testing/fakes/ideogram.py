"""Fake Ideogram (v1 routes): multipart POST /v1/ideogram-v3/generate|remix|edit and /v1/ideogram-v4/generate
with the `Api-Key` header -> {created (an ISO date string), data[{url, prompt, resolution, is_image_safe,
seed, style_type}]}; the URLs are signed (`?exp=&sig=`) and served here. As the OpenAPI says: a prompt that
fails the safety check is a 422, an image that fails it is `is_image_safe: false` with no URL (the
`unsafe_one` step makes the second image so), `aspect_ratio` and `resolution` together are a 400, v4 takes
`text_prompt` and refuses FLASH, edit needs an image and a same-size mask (black = change). Error bodies
are `{"error": ...}` (a 429 adds `reject_reason`)."""

from __future__ import annotations

from typing import Any

from .base import Reply, multipart, seen_image
from .images_api import FakeImagesApi, bytes_size


class FakeIdeogram(FakeImagesApi):
    name = "ideogram"

    def is_generation(self, req: dict[str, Any]) -> bool:
        return req["method"] == "POST" and req["path"].startswith("/v1/ideogram-v")

    def authorised(self, req: dict[str, Any]) -> bool:
        return req["headers"].get("api-key") == self.key

    def error_body(self, message: str) -> Any:
        return {"error": message}

    def rate_limited(self) -> Reply:
        return Reply(429, {"error": "Too many requests in flight", "reject_reason": "inflight_limit"},
                     {"Retry-After": "1"})

    def answer(self, req: dict[str, Any], step: str) -> Reply:
        if "multipart/form-data" not in req["headers"].get("content-type", ""):
            return Reply(400, {"error": "Content-Type must be multipart/form-data"})
        parts = {p.name: p for p in multipart(req)}
        form = {k: p.text for k, p in parts.items() if p.filename is None}
        version, route = req["path"].split("/")[2:4]
        prompt = form.get("text_prompt" if version == "ideogram-v4" and route == "generate" else "prompt")
        if not prompt:
            return Reply(400, {"error": "prompt is required"})
        if "aspect_ratio" in form and "resolution" in form:
            return Reply(400, {"error": "aspect_ratio cannot be used in conjunction with resolution"})
        if version == "ideogram-v4" and form.get("rendering_speed") == "FLASH":
            return Reply(400, {"error": "rendering_speed FLASH is not available for Ideogram 4.0"})
        w, h = (int(v) for v in form.get("resolution", "1024x1024").split("x"))
        if route in ("remix", "edit"):
            if "image" not in parts or (seen := seen_image(parts["image"].data)) is None:
                return Reply(400, {"error": "image: could not read the image"})
            if route == "edit":
                mask = parts.get("mask")
                if mask is None or bytes_size(mask.data) != (seen.width, seen.height):
                    return Reply(400, {"error": "mask must be provided and match the image's size"})
                w, h = seen.width, seen.height
            self.state.setdefault("edits", []).append({"route": route, "form": form, "input": seen,
                                                       "mask": parts["mask"].data if "mask" in parts else None})
        if step == "refuse":
            return Reply(422, {"error": "Prompt failed the safety check"})
        n = int(form.get("num_images", 1))
        seed = int(form["seed"]) if "seed" in form else 12345
        items = self.items("ok" if step == "unsafe_one" else step, n, w, h, seed, as_url=True)
        data = [{"url": f"{i['url']}?exp=1764640800&sig=abc123", "prompt": prompt, "resolution": f"{w}x{h}",
                 "is_image_safe": True, "seed": seed + k, "style_type": "GENERAL"} for k, i in enumerate(items)]
        if step == "unsafe_one" and len(data) > 1:
            data[1] |= {"url": None, "is_image_safe": False}
        return Reply(200, {"created": "2026-12-02 06:00:00+00:00", "data": data})
