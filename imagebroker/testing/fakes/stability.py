"""Fake Stability AI v2beta: multipart POST /v2beta/stable-image/generate/{ultra,core,sd3} (sd3 also in
`mode=image-to-image`: an `image` file and a `strength`, no aspect_ratio) and /v2beta/stable-image/edit/inpaint
(`image` and `mask` files, the same size); /v2beta/stable-image/control/{sketch,structure} (an `image` file,
`control_strength` 0-1, no aspect_ratio: the output has the image's size) and control/style (an `image` file,
`fidelity` 0-1, `aspect_ratio`). An edit's output has the input image's size."""

from __future__ import annotations

import base64
from typing import Any

from .base import FakeServer, Reply, multipart, seen_image

CONTROLS = ("sketch", "structure", "style")
SIZES = {"1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640), "2:3": (832, 1216),
         "3:2": (1216, 832), "4:5": (896, 1088), "5:4": (1088, 896), "9:16": (768, 1344), "9:21": (640, 1536)}


class FakeStability(FakeServer):
    name = "stability"

    def error_body(self, message: str) -> Any:
        return {"id": "e1", "name": "error", "errors": [message]}

    def bad_key(self) -> Reply:
        return Reply(401, {"id": "e1", "name": "unauthorized", "errors": ["invalid api key"]})

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        inpaint = req["path"] == "/v2beta/stable-image/edit/inpaint"
        control = req["path"].removeprefix("/v2beta/stable-image/control/")
        if control not in CONTROLS and not (req["path"].startswith("/v2beta/stable-image/generate/") or inpaint):
            return self.other(req)
        parts = multipart(req)
        fields = {p.name: p.text for p in parts if p.filename is None}
        files = {p.name: seen_image(p.data) for p in parts if p.filename is not None}
        if control in CONTROLS:
            if (why := self.control_problem(control, fields, files)) is not None:
                return Reply(400, self.error_body(why))
            self.state.setdefault("controls", []).append({"path": req["path"], "fields": fields, "files": files})
            w, h = SIZES[fields.get("aspect_ratio", "1:1")] if control == "style" else (
                files["image"].width, files["image"].height)
        elif fields.get("mode") == "image-to-image" or inpaint:
            if (why := self.edit_problem(fields, files, inpaint)) is not None:
                return Reply(400, self.error_body(why))
            self.state.setdefault("edits", []).append({"path": req["path"], "fields": fields, "files": files})
            w, h = files["image"].width, files["image"].height
        else:
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

    @staticmethod
    def control_problem(control: str, fields: dict[str, str], files: dict[str, Any]) -> str | None:
        if files.get("image") is None:
            return "image: required, and must be a PNG, JPEG or WebP file"
        if not fields.get("prompt"):
            return "prompt: required"
        name = "fidelity" if control == "style" else "control_strength"
        if control != "style" and "aspect_ratio" in fields:
            return "aspect_ratio: not a field of this endpoint (the output has the image's size)"
        try:
            value = float(fields.get(name, 0.5))
        except ValueError:
            return f"{name}: must be a number"
        return None if 0 <= value <= 1 else f"{name}: must be between 0 and 1"

    @staticmethod
    def edit_problem(fields: dict[str, str], files: dict[str, Any], inpaint: bool) -> str | None:
        if files.get("image") is None:
            return "image: required, and must be a PNG, JPEG or WebP file"
        if inpaint:
            mask = files.get("mask")
            if mask is None:
                return "mask: must be an image file (or give the image an alpha channel)"
            if (mask.width, mask.height) != (files["image"].width, files["image"].height):
                return "mask: must have the same dimensions as the image"
            return None
        if "aspect_ratio" in fields:
            return "aspect_ratio: not allowed in image-to-image mode"
        try:
            strength = float(fields["strength"])
        except (KeyError, ValueError):
            return "strength: required in image-to-image mode"
        return None if 0 <= strength <= 1 else "strength: must be between 0 and 1"
