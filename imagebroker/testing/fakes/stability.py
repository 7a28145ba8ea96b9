"""Fake Stability AI v2beta: multipart POST /v2beta/stable-image/generate/{ultra,core,sd3}."""

from __future__ import annotations

import base64
import re
from typing import Any

from .base import FakeServer, Reply

SIZES = {"1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640), "2:3": (832, 1216),
         "3:2": (1216, 832), "4:5": (896, 1088), "5:4": (1088, 896), "9:16": (768, 1344), "9:21": (640, 1536)}


def form_fields(body: bytes) -> dict[str, str]:
    return {m.group(1).decode(): m.group(2).decode() for m in re.finditer(
        rb'name="([^"]+)"\r\n\r\n(.*?)\r\n--', body, flags=re.S)}


class FakeStability(FakeServer):
    name = "stability"

    def error_body(self, message: str) -> Any:
        return {"id": "e1", "name": "error", "errors": [message]}

    def bad_key(self) -> Reply:
        return Reply(401, {"id": "e1", "name": "unauthorized", "errors": ["invalid api key"]})

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        if not req["path"].startswith("/v2beta/stable-image/generate/"):
            return self.other(req)
        fields = form_fields(req["body"])
        w, h = SIZES[fields.get("aspect_ratio", "1:1")]
        seed = int(fields.get("seed", 0)) or 12345
        if step == "refuse":  # HTTP 200, but the output was filtered
            return Reply(200, {"image": base64.b64encode(self.images("ok", 1, w, h, 0)[0]).decode(),
                               "finish_reason": "CONTENT_FILTERED", "seed": seed})
        imgs = self.images(step, 1, w, h, seed)
        if not imgs:
            return Reply(200, {"finish_reason": "SUCCESS", "seed": seed})
        return Reply(200, {"image": base64.b64encode(imgs[0]).decode(), "finish_reason": "SUCCESS",
                           "seed": seed})
