"""Fake Gemini API: POST /v1beta/models/{model}:generateContent -> inline base64 image + usageMetadata."""

from __future__ import annotations

import base64
import json
from typing import Any

from .base import FakeServer, Reply, seen_image

IMAGE_INPUT_TOKENS = 560   # per input image (Vertex's gemini-3-pro-image page)
OUTPUT_TOKENS = 1120       # per 1K image of the 3.x models (Vertex's model pages)

SIZES = {("1:1", "1K"): (1024, 1024), ("2:3", "1K"): (832, 1248), ("3:2", "1K"): (1248, 832),
         ("3:4", "1K"): (864, 1184), ("4:3", "1K"): (1184, 864), ("9:16", "1K"): (768, 1344),
         ("16:9", "1K"): (1344, 768), ("21:9", "1K"): (1536, 672), ("1:1", "2K"): (2048, 2048),
         ("1:1", "4K"): (4096, 4096)}


IMAGEN_SIZES = {"1:1": (1024, 1024), "3:4": (896, 1280), "4:3": (1280, 896), "9:16": (768, 1408), "16:9": (1408, 768)}


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
        if req["path"].endswith(":predict"):
            return self.predict(req, step)
        if not req["path"].endswith(":generateContent"):
            return self.other(req)
        body = json.loads(req["body"])
        if step == "refuse":
            return Reply(200, {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {
                "promptTokenCount": 9, "totalTokenCount": 9}})
        inputs = []
        for part in body["contents"][0]["parts"]:
            if "inlineData" in part or "inline_data" in part:
                inline = part.get("inlineData") or part["inline_data"]
                seen = seen_image(inline.get("data", ""))
                if seen is None or (inline.get("mimeType") or inline.get("mime_type")) != f"image/{seen.format}":
                    message = "Unable to process input image. Please retry or report in the troubleshooting guide."
                    return Reply(400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})
                inputs.append(seen)
        if len(inputs) > 14:
            return Reply(400, {"error": {"code": 400, "message": "Too many images in the request: at most 14.",
                                         "status": "INVALID_ARGUMENT"}})
        self.state.setdefault("inputs", []).append(inputs)
        cfg = body["generationConfig"]["imageConfig"]
        w, h = SIZES[(cfg["aspectRatio"], cfg["imageSize"])]
        imgs = self.images(step, 1, w, h, 3)
        parts = [{"inlineData": {"mimeType": "image/png", "data": base64.b64encode(b).decode()}}
                 for b in imgs]
        return Reply(200, {
            "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 9 + IMAGE_INPUT_TOKENS * len(inputs),
                              "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}] + (
                                  [{"modality": "IMAGE", "tokenCount": IMAGE_INPUT_TOKENS * len(inputs)}]
                                  if inputs else []),
                              "candidatesTokenCount": OUTPUT_TOKENS * len(imgs),
                              "candidatesTokensDetails": [{"modality": "IMAGE",
                                                           "tokenCount": OUTPUT_TOKENS * len(imgs)}]},
            "responseId": f"resp-{self.generations}"})

    def predict(self, req: dict[str, Any], step: str) -> Reply:
        """Imagen's `:predict`: `instances[{prompt}]`, `parameters{sampleCount 1-4, aspectRatio}` ->
        `predictions[{bytesBase64Encoded, mimeType}]`; `seed` and `negativePrompt` are refused (Vertex only),
        and a filtered image is `{raiFilteredReason}` (the `refuse` step filters them all)."""
        body = json.loads(req["body"])
        params = body.get("parameters") or {}
        for field in ("seed", "negativePrompt", "addWatermark", "enhancePrompt"):
            if field in params:
                return Reply(400, {"error": {"code": 400, "message": f"{field} parameter is not supported in "
                                             "Gemini API.", "status": "INVALID_ARGUMENT"}})
        n = int(params.get("sampleCount", 4))
        ratio = params.get("aspectRatio", "1:1")
        if not 1 <= n <= 4 or ratio not in IMAGEN_SIZES:
            return Reply(400, {"error": {"code": 400, "message": "Invalid sampleCount or aspectRatio",
                                         "status": "INVALID_ARGUMENT"}})
        if step == "refuse":
            reason = ("Your current safety filter threshold filtered out the generated image. Try rephrasing the "
                      "prompt.")
            return Reply(200, {"predictions": [{"raiFilteredReason": reason}] * n})
        imgs = self.images(step, n, *IMAGEN_SIZES[ratio], None)
        return Reply(200, {"predictions": [{"bytesBase64Encoded": base64.b64encode(b).decode(),
                                            "mimeType": "image/png"} for b in imgs]})
