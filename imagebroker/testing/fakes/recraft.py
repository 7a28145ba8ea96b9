"""Fake Recraft: POST /v1/images/generations (JSON) and multipart /v1/images/imageToImage and /v1/images/inpaint
-> {created, credits, data[{image_id, b64_json|url}]}. `credits` is what the request cost in API units (40 a
raster image on V3/V4, 35 on V4.1, 250 on V4 Pro, 1,000 to the dollar). A bad token is a text/plain 401
"request unauthorized" and an unknown path a text/plain "404 page not found", as Recraft's docs describe;
the shape of a moderation refusal is not documented (a 400 JSON body naming NSFW content is the fake's)."""

from __future__ import annotations

import uuid
from typing import Any

from .base import Reply, multipart, seen_image
from .images_api import FakeImagesApi, bytes_size

UNITS = {"recraftv4_1": 35, "recraftv4": 40, "recraftv4_pro": 250, "recraftv3": 40, "recraftv2": 22}


class FakeRecraft(FakeImagesApi):
    name = "recraft"
    prefix = "/v1"
    paths = ("/v1/images/generations", "/v1/images/imageToImage", "/v1/images/inpaint")

    def bad_key(self) -> Reply:
        return Reply(401, b"request unauthorized", content_type="text/plain")

    def other(self, req: dict[str, Any]) -> Reply:
        if req["path"].startswith("/files/"):
            return super().other(req)
        return Reply(404, b"404 page not found", content_type="text/plain")

    def answer(self, req: dict[str, Any], step: str) -> Reply:
        if req["path"] == "/v1/images/generations":
            body = self.json_body(req)
            w, h = (int(v) for v in str(body.get("size", "1024x1024")).split("x"))
        else:
            parts = {p.name: p for p in multipart(req)}
            body = {k: p.text for k, p in parts.items() if p.filename is None}
            if "image" not in parts or (seen := seen_image(parts["image"].data)) is None:
                return Reply(400, {"code": "invalid_image", "message": "image: cannot decode"})
            inpaint = req["path"].endswith("/inpaint")
            if inpaint and ("mask" not in parts or bytes_size(parts["mask"].data) != (seen.width, seen.height)):
                return Reply(400, {"code": "invalid_mask", "message": "mask must be the image's size"})
            if inpaint and not str(body.get("model", "recraftv3")).startswith("recraftv3"):
                return Reply(400, {"code": "invalid_model", "message": "inpaint supports recraftv3 only"})
            if not inpaint and "strength" not in body:
                return Reply(400, {"code": "missing_strength", "message": "strength is required"})
            self.state.setdefault("edits", []).append({"path": req["path"], "body": body, "input": seen})
            w, h = seen.width, seen.height
        if step == "refuse":
            return Reply(400, {"code": "nsfw_content", "message": "The prompt was flagged as NSFW content"})
        n = int(body.get("n", 1))
        seed = int(body["random_seed"]) if "random_seed" in body else None
        items = self.items(step, n, w, h, seed, as_url=body.get("response_format") != "b64_json")
        for item in items:
            item["image_id"] = str(uuid.uuid4())
        units = UNITS.get(str(body.get("model", "recraftv4_1")), 40)
        return Reply(200, {"created": 1764633600, "credits": units * len(items), "data": items})
