"""Fake Azure OpenAI: POST /openai/deployments/{deployment}/images/generations|edits?api-version=... with the
`api-key` header -> {created, data[{b64_json, content_filter_results, prompt_filter_results}], usage}. An
unknown deployment is a 404 `DeploymentNotFound`, a missing api-version a 404, a bad key a 401 whose code
is the string "401", a 429 has the string code "429" and Retry-After, and a content-filter refusal is a
400 `content_policy_violation` with `inner_error.code = ResponsibleAIPolicyViolation`, as Microsoft's docs
and captured answers show. gpt-image tokens: gpt-image-1's output tokens per quality and size
(azure-ai-docs overview.md); 1,024 input tokens per input image."""

from __future__ import annotations

from typing import Any

from .base import Reply, multipart, seen_image
from .images_api import FakeImagesApi, bytes_size

DEPLOYMENTS = {"gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini", "dall-e-3", "images-eu"}
TOKENS = {"low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
          "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
          "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208}}
FILTERS = {c: {"filtered": False, "severity": "safe"} for c in ("hate", "sexual", "violence", "self_harm")}


class FakeAzure(FakeImagesApi):
    name = "azure"

    def is_generation(self, req: dict[str, Any]) -> bool:
        return req["method"] == "POST" and req["path"].startswith("/openai/deployments/")

    def authorised(self, req: dict[str, Any]) -> bool:
        return req["headers"].get("api-key") == self.key

    def error_body(self, message: str) -> Any:
        return {"error": {"code": "InternalServerError", "message": message}}

    def bad_key(self) -> Reply:
        return Reply(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key "
                                     "or wrong API endpoint. Make sure to provide a valid key for an active "
                                     "subscription and use a correct regional API endpoint for your resource."}})

    def rate_limited(self) -> Reply:
        return Reply(429, {"error": {"code": "429", "message": "Requests to the Images_Generations Operation have "
                                     "exceeded the rate limit. Try again in 1 seconds."}}, {"Retry-After": "1"})

    def answer(self, req: dict[str, Any], step: str) -> Reply:
        _, _, _, deployment, *rest = req["path"].split("/")
        if "api-version" not in req["query"]:
            return Reply(404, {"error": {"code": "404", "message": "Resource not found"}})
        if deployment not in DEPLOYMENTS:
            return Reply(404, {"error": {"code": "DeploymentNotFound", "message": "The API deployment for this "
                                         "resource does not exist."}})
        inputs = []
        if rest == ["images", "edits"]:
            parts = multipart(req)
            body = {p.name: p.text for p in parts if p.filename is None}
            images = [p for p in parts if p.name in ("image", "image[]")]
            inputs = [seen_image(p.data) for p in images]
            if not inputs or None in inputs:
                return Reply(400, {"error": {"code": "invalid_image", "message": "Invalid image file."}})
            mask = next((p for p in parts if p.name == "mask"), None)
            if mask is not None and bytes_size(mask.data) != (inputs[0].width, inputs[0].height):
                return Reply(400, {"error": {"code": "invalid_mask", "message": "Mask size must match the image"}})
            self.state.setdefault("edits", []).append({"body": body, "inputs": inputs, "mask": mask is not None})
        else:
            body = self.json_body(req)
        if body.get("output_format") == "webp":
            return Reply(400, {"error": {"code": "invalid_value", "message": "output_format webp is not supported"}})
        if step == "refuse":
            return Reply(400, {"error": {
                "code": "content_policy_violation", "type": "invalid_request_error", "param": "prompt",
                "message": "Your request was rejected as a result of our safety system.",
                "inner_error": {"code": "ResponsibleAIPolicyViolation",
                                "content_filter_results": FILTERS | {"violence": {"filtered": True,
                                                                                  "severity": "high"}}}}})
        size, quality = str(body.get("size", "1024x1024")), str(body.get("quality", "high"))
        w, h = (int(v) for v in size.split("x"))
        n = int(body.get("n", 1))
        items = self.items(step, n, w, h, None, as_url=False)
        for item in items:
            item |= {"content_filter_results": FILTERS, "prompt_filter_results": FILTERS}
        out = TOKENS.get(quality, TOKENS["high"]).get(size, 4160) * len(items)
        usage = {"input_tokens": 12 + 1024 * len(inputs), "output_tokens": out, "total_tokens": out + 12,
                 "input_tokens_details": {"text_tokens": 12, "image_tokens": 1024 * len(inputs)}}
        return Reply(200, {"created": 1764633600, "data": items, "usage": usage}, {"x-request-id": "az-req-1"})
