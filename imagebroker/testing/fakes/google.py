"""Fake Gemini API: POST /v1beta/models/{model}:generateContent -> inline base64 image + usageMetadata."""

from __future__ import annotations

import base64
import json
from typing import Any

from .base import FakeServer, Reply

SIZES = {("1:1", "1K"): (1024, 1024), ("2:3", "1K"): (832, 1248), ("3:2", "1K"): (1248, 832),
         ("3:4", "1K"): (864, 1184), ("4:3", "1K"): (1184, 864), ("9:16", "1K"): (768, 1344),
         ("16:9", "1K"): (1344, 768), ("21:9", "1K"): (1536, 672), ("1:1", "2K"): (2048, 2048),
         ("1:1", "4K"): (4096, 4096)}


class FakeGoogle(FakeServer):
    name = "google"

    def authorised(self, req: dict[str, Any]) -> bool:  # Gemini API key, or a Vertex bearer token
        h = req["headers"]
        return h.get("x-goog-api-key") == self.key or h.get("authorization") == f"Bearer {self.key}"

    def error_body(self, message: str) -> Any:
        return {"error": {"code": 500, "message": message, "status": "INTERNAL"}}

    def bad_key(self) -> Reply:
        message = "API key not valid. Please pass a valid API key."
        return Reply(400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        if not req["path"].endswith(":generateContent"):
            return self.other(req)
        body = json.loads(req["body"])
        if step == "refuse":
            return Reply(200, {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {
                "promptTokenCount": 9, "totalTokenCount": 9}})
        cfg = body["generationConfig"]["imageConfig"]
        w, h = SIZES[(cfg["aspectRatio"], cfg["imageSize"])]
        imgs = self.images(step, 1, w, h, 3)
        parts = [{"inlineData": {"mimeType": "image/png", "data": base64.b64encode(b).decode()}}
                 for b in imgs]
        return Reply(200, {
            "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1290 * len(imgs),
                              "candidatesTokensDetails": [{"modality": "IMAGE",
                                                           "tokenCount": 1290 * len(imgs)}]},
            "responseId": f"resp-{self.generations}"})
