"""Fake OpenAI Images API: POST /v1/images/generations (JSON) and POST /v1/images/edits (multipart: repeated
`image[]` file parts, an optional `mask` PNG with alpha) -> {created, data[].b64_json, usage}.

Edits are checked as the real API checks them: every image part must be a typed PNG, JPEG or WebP file
(a part sent as application/octet-stream is refused), the mask a PNG with an alpha channel the size of the
first image. Input-image tokens are reported per image as 32 px patches, at most 1,536 (as described for
gpt-image-2 by third parties), and each input image adds 15 text tokens (as observed in billed usage)."""

from __future__ import annotations

import base64
import json
from typing import Any

from ..images import make_image, with_c2pa
from .base import FakeServer, Reply, multipart, seen_image

# image-output tokens reported per quality at 1024x1024 (in proportion to the area at other sizes); with `auto`
# the fake picks between medium and high, as the real service may: a call estimated at medium settles dearer
# (the budget must have reserved the bound)
TOKENS = {"low": 196, "medium": 1756, "high": 7024, "auto": 4168}
PREVIEW_TOKENS = 100   # image-output tokens each streamed preview adds


class FakeOpenAI(FakeServer):
    name = "openai"
    prefix = "/v1"

    def error_body(self, message: str) -> Any:
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}

    def bad_key(self) -> Reply:
        return Reply(401, {"error": {"message": "Incorrect API key provided: sk-***.", "type":
                                     "invalid_request_error", "param": None, "code": "invalid_api_key"}})

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        if req["path"] == "/v1/images/edits":
            body, inputs = self.edit_form(req)
            if isinstance(body, Reply):
                return body
        elif req["path"] == "/v1/images/generations":
            body, inputs = json.loads(req["body"]), []
        else:
            return self.other(req)
        if body["model"] in ("gpt-image-1", "dall-e-3"):
            return Reply(404, {"error": {"message": f"The model `{body['model']}` does not exist",
                                         "type": "invalid_request_error", "code": "model_not_found"}})
        if step == "refuse":
            message = "Your request was rejected by the safety system. safety_violations=[violence]"
            return Reply(400, {"error": {"message": message, "type": "image_generation_user_error",
                                         "param": None, "code": "moderation_blocked"}})
        size = body.get("size") or "auto"
        if size == "auto":
            size = f"{inputs[0].width}x{inputs[0].height}" if inputs else "1024x1024"
        w, h = (int(v) for v in size.split("x"))
        fmt = body.get("output_format", "png")
        n = body.get("n", 1)
        images = [] if step == "empty" else [b"not an image"] * n if step == "broken" else [
            make_image(w, h, seed=i, fmt=fmt) for i in range(n)]
        if step == "c2pa":   # as OpenAI signs its images: content credentials in the file
            images = [with_c2pa(b) for b in images]
        quality = body.get("quality", "auto")  # the real default
        streamed = str(body.get("stream", "")).lower() == "true"
        previews = int(body.get("partial_images") or 0) if streamed else 0
        per_image = -(-TOKENS.get(quality, 1756) * w * h // (1024 * 1024))   # image tokens grow with the area
        out_tokens = per_image * len(images) + PREVIEW_TOKENS * previews
        prompt_tokens = max(1, len(body["prompt"]) // 4) + 15 * len(inputs)
        image_tokens = sum(min(1536, -(-i.width // 32) * -(-i.height // 32)) for i in inputs)
        usage = {"input_tokens": prompt_tokens + image_tokens, "output_tokens": out_tokens,
                 "total_tokens": prompt_tokens + image_tokens + out_tokens,
                 "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": image_tokens}}
        headers = {"x-request-id": f"req_{self.generations}"}
        if streamed:
            return self.stream(req, step, images, previews, w, h, fmt, quality, usage, headers)
        return Reply(200, {
            "created": 1763700000, "size": body.get("size"), "quality": quality, "output_format": fmt,
            "data": [{"b64_json": base64.b64encode(b).decode()} for b in images],
            "usage": {**usage, "output_tokens_details": {"image_tokens": out_tokens, "text_tokens": 0}}}, headers)

    def stream(self, req: dict[str, Any], step: str, images: list[bytes], previews: int, w: int, h: int, fmt: str,
               quality: str, usage: dict[str, Any], headers: dict[str, str]) -> Reply:
        """`stream: true`: server-sent events, `partial_images` previews then one completed event with the usage
        (no output_tokens_details there, as the real event has none). Step `cut`: the stream ends after the
        previews, without its completed event."""
        kind = "image_edit" if req["path"].endswith("/edits") else "image_generation"
        common = {"created_at": 1763700000, "size": f"{w}x{h}", "quality": quality, "background": "auto",
                  "output_format": fmt}
        events = [(f"{kind}.partial_image", {**common, "type": f"{kind}.partial_image", "partial_image_index": i,
                   "b64_json": base64.b64encode(make_image(w, h, seed=1000 + i, fmt=fmt)).decode()})
                  for i in range(previews)]
        if step != "cut":
            events += [(f"{kind}.completed", {**common, "type": f"{kind}.completed", "usage": usage,
                                               "b64_json": base64.b64encode(b).decode()}) for b in images]
        body = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)
        return Reply(200, body.encode(), headers, content_type="text/event-stream")

    def edit_form(self, req: dict[str, Any]) -> tuple[Any, list[Any]]:
        """The edit's fields and its input images as read, or a 400 Reply saying what the real API says."""
        try:
            parts = multipart(req)
        except ValueError:
            return self.invalid("image", "Expected multipart/form-data"), []
        body: dict[str, Any] = {p.name: p.text for p in parts if p.filename is None}
        body["n"] = int(body.get("n", 1))
        images, mask = [p for p in parts if p.name in ("image", "image[]")], [p for p in parts if p.name == "mask"]
        if not images:
            return self.invalid("image", "Missing required parameter: 'image'."), []
        inputs = []
        for part in images:
            if part.content_type not in ("image/png", "image/jpeg", "image/webp"):
                return self.invalid("image", f"Invalid file 'image': unsupported mimetype ('{part.content_type}'). "
                                    "Supported file formats are 'image/jpeg', 'image/png', and 'image/webp'."), []
            if (seen := seen_image(part.data)) is None:
                return self.invalid("image", "Invalid image file or mode for image 1, please check your "
                                    "image file."), []
            inputs.append(seen)
        if len(inputs) > 16:
            return self.invalid("image", "Too many images: at most 16."), []
        if mask:
            m = seen_image(mask[0].data)
            if m is None or m.format != "png" or m.mode not in ("RGBA", "LA"):
                return self.invalid("mask", "Invalid mask image: it must be a PNG with an alpha channel."), []
            if (m.width, m.height) != (inputs[0].width, inputs[0].height):
                return self.invalid("mask", "Invalid mask image: it must have the same dimensions as the image."), []
            body["mask_sha256"] = m.sha256
        if "moderation" in body:
            return self.invalid("moderation", "Unknown parameter: 'moderation'."), []
        self.state.setdefault("edits", []).append({"fields": body, "images": inputs,
                                                   "parts": [(p.name, p.filename, p.content_type) for p in parts],
                                                   "mask": mask[0].data if mask else None})
        return body, inputs

    def invalid(self, param: str, message: str) -> Reply:
        return Reply(400, {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                     "code": "invalid_value"}})
