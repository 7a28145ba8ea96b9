"""Fake BytePlus ModelArk: POST /api/v3/images/generations -> {model, created, data[{b64_json|url, size}],
usage{generated_images, output_tokens, total_tokens}}. As the docs and SDK describe: no `n` (one image
unless `sequential_image_generation` says otherwise), `watermark` defaults to true (the fake records it),
`seed` and `guidance_scale` are refused outside Seedream 3.0 and SeedEdit, `image` is refused by 3.0,
Seedream 4.5 refuses sizes under 3,686,400 pixels, refusals are 400s coded `...SensitiveContentDetected`,
and messages end in "Request id: ...". `partial` fails the second image of a group alone (`data[1].error`)."""

from __future__ import annotations

from typing import Any

from .base import Reply
from .images_api import FakeImagesApi, inputs_seen

SEEDABLE = ("seedream-3-0-t2i", "seededit")


def error(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"error": {"code": code, "message": f"{message} Request id: 0217646336000001",
                                    "param": "", "type": ""}})


class FakeBytePlus(FakeImagesApi):
    name = "byteplus"
    prefix = "/api/v3"
    paths = ("/api/v3/images/generations",)

    def error_body(self, message: str) -> Any:
        return {"error": {"code": "InternalServiceError", "message": message, "param": "", "type": ""}}

    def bad_key(self) -> Reply:
        return error(401, "AuthenticationError", "The API key in the request is missing or invalid.")

    def rate_limited(self) -> Reply:
        reply = error(429, "RateLimitExceeded.EndpointRPMExceeded", "Your account has exceeded the RPM limit.")
        return Reply(429, reply.body, {"Retry-After": "1"})

    def answer(self, req: dict[str, Any], step: str) -> Reply:
        body = self.json_body(req)
        model = str(body.get("model", ""))
        if "n" in body or "max_images" in body:
            return error(400, "InvalidParameter", f"the parameter `{'n' if 'n' in body else 'max_images'}` "
                                                  "is not supported")
        for field in ("seed", "guidance_scale"):
            if field in body and not model.startswith(SEEDABLE):
                return error(400, "InvalidParameter", f"the parameter `{field}` is not supported by the "
                                                      "current model")
        refs = body.get("image")
        refs = [] if refs is None else [refs] if isinstance(refs, str) else list(refs)
        if refs:
            if model.startswith("seedream-3-0-t2i"):
                return error(400, "InvalidParameter", "the parameter `image` is not supported by the current model")
            seen = inputs_seen([str(r) for r in refs])
            if seen is None:
                return error(400, "InvalidParameter", "image: cannot decode the input image")
            self.state.setdefault("edits", []).append({"body": body, "inputs": seen})
        size = str(body.get("size", "2048x2048"))
        if size == "adaptive":
            w, h = (seen[0].width, seen[0].height) if refs else (1024, 1024)
        else:
            w, h = (int(v) for v in size.split("x"))
            if model.startswith("seedream-4-5") and w * h < 3_686_400:
                return error(400, "InvalidParameter", "image size must be at least 3686400 pixels")
        self.state.setdefault("watermarks", []).append(body.get("watermark", True))
        if step == "refuse":
            return error(400, "OutputImageSensitiveContentDetected",
                         "The request failed because the output image may contain sensitive information.")
        n = 2 if step == "partial" else 1
        items = self.items("ok" if step == "partial" else step, n, w, h, body.get("seed"),
                           as_url=body.get("response_format") != "b64_json", fmt="jpeg")
        for item in items:
            item["size"] = f"{w}x{h}"
        if step == "partial":
            items[1] = {"error": {"code": "OutputImageSensitiveContentDetected", "message": "filtered"}}
        made = sum("error" not in i for i in items)
        tokens = w * h // 256 * made
        return Reply(200, {"model": model, "created": 1764633600, "data": items,
                           "usage": {"generated_images": made, "output_tokens": tokens, "total_tokens": tokens}})
