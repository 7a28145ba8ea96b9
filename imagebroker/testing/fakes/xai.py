"""Fake xAI: POST /v1/images/generations and JSON-only POST /v1/images/edits -> {data[{b64_json|url,
mime_type, revised_prompt}], usage{cost_in_usd_ticks}}, as docs.x.ai describes them: `size` is refused
with 400 "Argument not supported: size", an edit sent as multipart is refused with 415, a wrong key is a
400 (a missing header a 401), and errors are flat `{code, error}` bodies. Every answer carries the charge
in ticks (10^10 per USD): $0.02 per image made, and (the fake's own figure: xAI bills edits' inputs but its
rate was not found) $0.002 per input image; a moderation refusal is a 400 that still reports the charge."""

from __future__ import annotations

from typing import Any

from .base import Reply
from .images_api import FakeImagesApi, inputs_seen

TICKS_PER_IMAGE = 200_000_000     # $0.02 (docs.x.ai cost-tracking example)
TICKS_PER_INPUT = 20_000_000      # $0.002, the fake's own figure
SIZES = {("1:1", "1k"): (1024, 1024), ("16:9", "1k"): (1408, 768), ("9:16", "1k"): (768, 1408),
         ("4:3", "1k"): (1280, 896), ("3:4", "1k"): (896, 1280), ("1:1", "2k"): (2048, 2048),
         ("16:9", "2k"): (2816, 1536), ("9:16", "2k"): (1536, 2816)}
INVALID = "Client specified an invalid argument"


class FakeXAI(FakeImagesApi):
    name = "xai"
    prefix = "/v1"
    paths = ("/v1/images/generations", "/v1/images/edits")

    def error_body(self, message: str) -> Any:
        return {"code": "Internal", "error": message}

    def authorised(self, req: dict[str, Any]) -> bool:
        return req["headers"].get("authorization") == f"Bearer {self.key}"

    def bad_key(self) -> Reply:
        return Reply(400, {"code": INVALID, "error": "Incorrect API key provided: fa***89. You can obtain an "
                                                     "API key from https://console.x.ai."})

    def answer(self, req: dict[str, Any], step: str) -> Reply:
        if "application/json" not in req["headers"].get("content-type", ""):
            return Reply(415, {"code": INVALID, "error": "Content-Type must be application/json"})
        body = self.json_body(req)
        for unsupported in ("size", "style"):
            if unsupported in body:
                return Reply(400, {"code": INVALID, "error": f"Argument not supported: {unsupported}"})
        n = int(body.get("n", 1))
        if not 1 <= n <= 10:
            return Reply(422, {"code": INVALID, "error": "n must be between 1 and 10"})
        refs = [body["image"]] if "image" in body else list(body.get("images") or [])
        if req["path"].endswith("/edits"):
            seen = inputs_seen([str((r or {}).get("url", "")) for r in refs])
            if not refs or seen is None or len(refs) > 3:
                return Reply(400, {"code": INVALID, "error": "image: expected 1 to 3 readable images"})
            self.state.setdefault("edits", []).append({"body": body, "inputs": seen})
            first = seen[0]   # the output follows the first input's aspect ratio, at about 1 MP
            w, h = min(SIZES.values(), key=lambda s: abs(s[0] / s[1] - first.width / first.height)
                       + (s[0] > 1500) * 9)
        else:
            key = (body.get("aspect_ratio", "1:1"), body.get("resolution", "1k"))
            if key not in SIZES:
                return Reply(400, {"code": INVALID, "error": f"unsupported aspect_ratio/resolution {key}"})
            w, h = SIZES[key]
        ticks = TICKS_PER_IMAGE * n + TICKS_PER_INPUT * len(refs)
        if step == "refuse":
            return Reply(400, {"code": INVALID, "error": "Generated image rejected by content moderation.",
                               "usage": {"cost_in_usd_ticks": ticks}})
        items = self.items(step, n, w, h, None, as_url=body.get("response_format") != "b64_json", fmt="jpeg")
        for item in items:
            item |= {"mime_type": "image/jpeg", "revised_prompt": f"A detailed picture: {body['prompt']}"}
        return Reply(200, {"data": items, "usage": {"cost_in_usd_ticks": ticks if items else 0}})
