"""Fake OpenAI Images API: POST /v1/images/generations -> {created, data[].b64_json, usage}."""

from __future__ import annotations

import base64
import json
from typing import Any

from ..images import make_image, with_c2pa
from .base import FakeServer, Reply

# image-output tokens reported per quality; with `auto` the fake picks between medium and high, as the real
# service may: a call estimated at medium settles dearer (the budget must have reserved the bound)
TOKENS = {"low": 196, "medium": 1756, "high": 7024, "auto": 4168}


class FakeOpenAI(FakeServer):
    name = "openai"
    prefix = "/v1"

    def error_body(self, message: str) -> Any:
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}

    def bad_key(self) -> Reply:
        return Reply(401, {"error": {"message": "Incorrect API key provided: sk-***.", "type":
                                     "invalid_request_error", "param": None, "code": "invalid_api_key"}})

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        if req["path"] != "/v1/images/generations":
            return self.other(req)
        body = json.loads(req["body"])
        if body["model"] in ("gpt-image-1", "dall-e-3"):
            return Reply(404, {"error": {"message": f"The model `{body['model']}` does not exist",
                                         "type": "invalid_request_error", "code": "model_not_found"}})
        if step == "refuse":
            message = "Your request was rejected by the safety system. safety_violations=[violence]"
            return Reply(400, {"error": {"message": message, "type": "image_generation_user_error",
                                         "param": None, "code": "moderation_blocked"}})
        w, h = (int(v) for v in body.get("size", "1024x1024").split("x"))
        fmt = body.get("output_format", "png")
        n = body.get("n", 1)
        images = [] if step == "empty" else [b"not an image"] * n if step == "broken" else [
            make_image(w, h, seed=i, fmt=fmt) for i in range(n)]
        if step == "c2pa":   # as OpenAI signs its images: content credentials in the file
            images = [with_c2pa(b) for b in images]
        quality = body.get("quality", "auto")  # the real default
        out_tokens = TOKENS.get(quality, 1756) * len(images)
        prompt_tokens = max(1, len(body["prompt"]) // 4)
        return Reply(200, {
            "created": 1763700000, "size": body.get("size"), "quality": quality, "output_format": fmt,
            "data": [{"b64_json": base64.b64encode(b).decode()} for b in images],
            "usage": {"input_tokens": prompt_tokens, "output_tokens": out_tokens,
                      "total_tokens": prompt_tokens + out_tokens,
                      "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0},
                      "output_tokens_details": {"image_tokens": out_tokens, "text_tokens": 0}}},
            {"x-request-id": f"req_{self.generations}"})
