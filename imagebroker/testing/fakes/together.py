"""Fake Together AI: POST /v1/images/generations."""

from __future__ import annotations

import base64
import json
from typing import Any

from .base import FakeServer, Reply, seen_image


class FakeTogether(FakeServer):
    name = "together"
    prefix = "/v1"

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        if req["path"] != "/v1/images/generations":
            return self.other(req)
        body = json.loads(req["body"])
        if "image_url" in body:
            if (seen := seen_image(str(body["image_url"]))) is None:
                return Reply(400, {"error": {"message": "image_url: could not load the image",
                                             "type": "invalid_request_error"}})
            self.state.setdefault("edits", []).append({"body": body, "input": seen})
        if step == "refuse":
            return Reply(422, {"error": {"message": "Prompt flagged by content moderation (nsfw)",
                                         "type": "invalid_request_error"}})
        imgs = self.images(step, body.get("n", 1), body["width"], body["height"], body.get("seed"))
        return Reply(200, {"id": f"tg-{self.generations}", "model": body["model"], "object": "list",
                           "data": [{"index": i, "b64_json": base64.b64encode(b).decode()}
                                    for i, b in enumerate(imgs)]})
