"""Google Gemini image models over REST `generateContent` (httpx2): inline base64 results, cost from
`usageMetadata` image tokens. One image per call (no sampleCount on Gemini image models).

Vertex AI (for EU processing): set `providers.google.options.project` (and `location`, default `eu`
when `region: eu`), and `api_key_env` to a variable holding an OAuth access token; the regional
host comes from the region option. Whether the 3.x image models are served in EU regions is not
verified."""

from __future__ import annotations

import base64
from typing import Any

from ..errors import BadProviderResponse, ContentRejected
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage
from .http import HttpProvider
from .offering import Offering, request_size

# the catalog's sizes -> (aspectRatio, imageSize)
SIZES = {"1024x1024": ("1:1", "1K"), "832x1248": ("2:3", "1K"), "1248x832": ("3:2", "1K"),
         "864x1184": ("3:4", "1K"), "1184x864": ("4:3", "1K"), "768x1344": ("9:16", "1K"),
         "1344x768": ("16:9", "1K"), "1536x672": ("21:9", "1K"), "2048x2048": ("1:1", "2K"),
         "4096x4096": ("1:1", "4K")}
# Imagen's sizes at 1K (Vertex's imagen-3.0-generate-001 page) -> aspectRatio; 2K is asked as sampleImageSize
IMAGEN_SIZES = {"1024x1024": "1:1", "896x1280": "3:4", "1280x896": "4:3", "768x1408": "9:16", "1408x768": "16:9"}
BLOCKED = {"SAFETY", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "PROHIBITED_CONTENT", "IMAGE_RECITATION",
           "RECITATION", "BLOCKLIST", "SPII", "IMAGE_OTHER", "NO_IMAGE"}


def _input_tokens(meta: dict[str, Any]) -> dict[str, int]:
    """Prompt tokens by modality (`promptTokensDetails`): an edit's input images are billed as image input;
    without the split, every prompt token is counted as text."""
    details = meta.get("promptTokensDetails") or []
    by = {d.get("modality"): int(d.get("tokenCount", 0)) for d in details if isinstance(d, dict)}
    if not by:
        return {"input_text_tokens": meta.get("promptTokenCount", 0)}
    return {"input_text_tokens": sum(v for k, v in by.items() if k != "IMAGE"),
            "input_image_tokens": by.get("IMAGE", 0)}


class GoogleProvider(HttpProvider):
    name = "google"
    api_key_env = "GEMINI_API_KEY"
    default_base_url = "https://generativelanguage.googleapis.com"

    def headers(self, key: str | None) -> dict[str, str]:
        if self.settings.options.get("project"):  # Vertex: an OAuth access token
            return {"Authorization": f"Bearer {key}"} if key else {}
        return {"x-goog-api-key": key} if key else {}

    def endpoint(self, offering: Offering, method: str = "generateContent") -> str:
        base, opts = self.base_url_for(offering), self.settings.options
        if opts.get("project"):
            location = opts.get("location") or self.settings.region or "global"
            return (f"{base}/v1beta1/projects/{opts['project']}/locations/{location}/publishers/google/models/"
                    f"{offering.model}:{method}")
        return f"{base}/v1beta/models/{offering.model}:{method}"

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where: dict[str, Any] = {"provider": self.name, "offering": offering.id}
        w, h = request_size(request, offering)
        if offering.settings.get("api") == "predict":
            return await self.predict(request, offering, ctx, where, (w, h))
        ratio, image_size = SIZES[f"{w}x{h}"]
        # an edit's images go inline before the prompt, as the SDK sends them (no mask: the prompt says it)
        images = [{"inlineData": {"mimeType": i.mime, "data": i.b64()}} for i in request.images]
        body: dict[str, Any] = {
            "contents": [{"role": "user", "parts": [*images, {"text": request.prompt}]}],
            "generationConfig": {"responseModalities": ["IMAGE"],
                                 "imageConfig": {"aspectRatio": ratio, "imageSize": image_size}}}
        body["generationConfig"].update(request.extra.get(self.name, {}))
        resp = await self.send("POST", self.endpoint(offering), where=where, json=body,
                               headers=self.headers(ctx.api_key), timeout=ctx.timeout_s)
        data = self.json(resp, where)
        feedback = data.get("promptFeedback") or {}
        if feedback.get("blockReason"):
            raise ContentRejected(f"Gemini blocked the prompt: {feedback['blockReason']}", **where)
        candidates = data.get("candidates") or []
        parts = ((candidates[0].get("content") or {}).get("parts") or []) if candidates else []
        reason = candidates[0].get("finishReason") if candidates else None
        images, texts = [], []
        try:
            for part in parts:
                if "inlineData" in part:
                    images.append(RawImage(base64.b64decode(part["inlineData"]["data"]), None))
                elif "text" in part:
                    texts.append(part["text"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadProviderResponse(f"unexpected response shape: {exc!r}", **where) from None
        if not images and (reason in BLOCKED or texts):
            why = reason if reason in BLOCKED else "answered with text: " + " ".join(texts)[:200]
            raise ContentRejected(f"Gemini returned no image ({why})", **where)
        meta = data.get("usageMetadata") or {}
        image_tokens = sum(d.get("tokenCount", 0) for d in meta.get("candidatesTokensDetails", [])
                           if d.get("modality") == "IMAGE") or meta.get("candidatesTokenCount", 0)
        usage = {"images": len(images), "width": w, "height": h, "output_image_tokens": image_tokens,
                 **_input_tokens(meta)}
        return ProviderResult(images, usage, data.get("responseId"),
                              {"aspectRatio": ratio, "imageSize": image_size, "input_images": len(request.images)})

    async def predict(self, request: ImageRequest, offering: Offering, ctx: CallContext, where: dict[str, Any],
                      size: tuple[int, int]) -> ProviderResult:
        """Imagen: `:predict` with `instances[{prompt}]` and `parameters{sampleCount, aspectRatio}`, answered
        with `predictions[{bytesBase64Encoded, mimeType}]`; a filtered image is `{raiFilteredReason}`. The
        Gemini API takes no seed or negative prompt here (Vertex only), and bills per image."""
        parameters: dict[str, Any] = {"sampleCount": request.n, "aspectRatio": IMAGEN_SIZES[f"{size[0]}x{size[1]}"],
                                      "includeRaiReason": True}
        parameters.update(request.extra.get(self.name, {}))
        body = {"instances": [{"prompt": request.prompt}], "parameters": parameters}
        resp = await self.send("POST", self.endpoint(offering, "predict"), where=where, json=body,
                               headers=self.headers(ctx.api_key), timeout=ctx.timeout_s)
        data = self.json(resp, where)
        predictions = (data.get("predictions") if isinstance(data, dict) else None) or []
        try:
            images = [RawImage(base64.b64decode(p["bytesBase64Encoded"]), None)
                      for p in predictions if p.get("bytesBase64Encoded")]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BadProviderResponse(f"unexpected response shape: {exc!r}", **where) from None
        if not images:
            reasons = [str(p.get("raiFilteredReason")) for p in predictions if isinstance(p, dict)
                       and p.get("raiFilteredReason")]
            if reasons or not predictions:
                raise ContentRejected(f"Imagen returned no image ({'; '.join(reasons)[:200] or 'filtered'})",
                                      **where)
        return ProviderResult(images, {"images": len(images), "width": size[0], "height": size[1]}, None,
                              {k: v for k, v in parameters.items()})
