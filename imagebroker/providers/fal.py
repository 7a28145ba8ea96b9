"""fal.ai queue API: submit, poll the status URL, fetch the result, download the images at once.
`Authorization: Key ...`; a timed-out or cancelled call is cancelled on fal (PUT cancel_url).
Billed per megapixel, each image rounded up: the units are the sizes fal reports."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..errors import BadProviderResponse, ContentRejected, ProviderUnavailable
from ..inputs import data_url, white_mask
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage, sampling_fields
from .http import HttpProvider
from .offering import Offering, request_size


class FalProvider(HttpProvider):
    name = "fal"
    api_key_env = "FAL_KEY"
    default_base_url = "https://queue.fal.run"

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Key {key}"} if key else {}

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where: dict[str, Any] = {"provider": self.name, "offering": offering.id}
        w, h = request_size(request, offering)
        body: dict[str, Any] = {"prompt": request.prompt, "image_size": {"width": w, "height": h},
                                "num_images": request.n,
                                "output_format": "png" if request.output_format == "png" else "jpeg"}
        body |= sampling_fields(request, offering, steps="num_inference_steps", guidance="guidance_scale",
                                negative_prompt=None)
        if request.is_edit:   # the edit endpoints take the init image (and mask) by URL, and its size
            del body["image_size"]
            body |= _edit_fields(request, offering)
        if request.adapters:
            body["loras"] = [{"path": a.ref, "scale": a.scale} for a in request.adapters]
        if request.control or request.image_prompts:
            body |= _control_fields(request, offering)
        body.update(request.extra.get(self.name, {}))
        headers, base = self.headers(ctx.api_key), self.base_url_for(offering)
        resp = await self.send("POST", f"{base}/{offering.model}", where=where, json=body, headers=headers,
                               timeout=ctx.timeout_s)
        handle = self.json(resp, where)
        if not isinstance(handle, dict) or "status_url" not in handle:
            raise BadProviderResponse("submit answered without a status_url", **where)
        where["request_id"] = handle.get("request_id")
        status_url = self.keyed_url(handle["status_url"], base, where)

        async def check() -> dict[str, Any] | None:
            r = await self.send("GET", status_url, where=where, headers=headers)
            status = self.json(r, where)
            if status.get("error"):
                raise ProviderUnavailable(f"fal: {status.get('error_type') or ''} {status['error']}",
                                          **where)
            if status.get("status") in ("FAILED", "CANCELED", "CANCELLED"):
                raise ProviderUnavailable(f"fal: request {status['status'].lower()}", **where)
            return status if status.get("status") == "COMPLETED" else None

        try:
            await self.poll(check, interval=self.settings.poll_interval_s or 0.25,
                            deadline_s=ctx.timeout_s, where=where)
        except (asyncio.CancelledError, ProviderUnavailable):
            with contextlib.suppress(Exception):
                cancel_url = self.keyed_url(handle["cancel_url"], base, where)
                await self.send("PUT", cancel_url, where=where, headers=headers, timeout=5)
            raise
        response_url = self.keyed_url(handle.get("response_url"), base, where)
        out = self.json(await self.send("GET", response_url, where=where, headers=headers), where)
        flags = out.get("has_nsfw_concepts") or []
        if any(flags):
            raise ContentRejected("fal's safety checker flagged the output", **where)
        try:
            items = out["images"]
            images = [RawImage(await self.download(i["url"], where, base_url=base),
                               None if out.get("seed") is None else out["seed"] + n)
                      for n, i in enumerate(items)]
            sizes = [[i.get("width") or w, i.get("height") or h] for i in items]
        except (KeyError, TypeError) as exc:
            raise BadProviderResponse(f"unexpected result shape: {exc!r}", **where) from None
        return ProviderResult(images, {"images": len(images), "sizes": sizes, "width": w, "height": h},
                              handle.get("request_id"), {k: _shown(v) for k, v in body.items() if k != "prompt"})


def _shown(value: Any) -> Any:
    """What was sent, with every data: URI (at any depth) as its length."""
    if isinstance(value, str) and value.startswith("data:"):
        return f"<data: URI, {len(value)} chars>"
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown(v) for v in value]
    return value


def _control_fields(request: ImageRequest, offering: Offering) -> dict[str, Any]:
    """flux-general's `controlnet_unions` (the union ControlNet the offering names, one entry per control
    with its `control_mode`) and `ip_adapters` (the IP-Adapter and CLIP image encoder it names), images as
    data: URIs."""
    s = offering.settings
    out: dict[str, Any] = {}
    if request.control:
        out["controlnet_unions"] = [{"path": s.get("controlnet_union"), "controls": [
            {"control_image_url": c.sent_image(offering.capabilities.control_input).data_url(),
             "control_mode": c.kind, "conditioning_scale": c.scale, "start_percentage": c.start,
             "end_percentage": c.end} for c in request.control]}]
    if request.image_prompts:
        weight = {"weight_name": s["ip_adapter_weight_name"]} if s.get("ip_adapter_weight_name") else {}
        out["ip_adapters"] = [{"path": s.get("ip_adapter"), "image_url": p.image.data_url(), "scale": p.scale,
                               "image_encoder_path": s.get("image_encoder"), **weight} for p in request.image_prompts]
    return out


def _edit_fields(request: ImageRequest, offering: Offering) -> dict[str, Any]:
    """`image_url` (and Fill's `mask_url`, white = fill) as data: URIs, and `strength` where the endpoint
    takes it. fal documents data URIs as taken by some models and URLs by all: an upload to fal's CDN
    first is not built."""
    edit = offering.capabilities.edit
    out: dict[str, Any] = {"image_url": request.images[0].data_url()}
    if request.mask is not None:
        out["mask_url"] = data_url(white_mask(request.mask))
    if edit is not None and edit.strength and request.strength is not None:
        out["strength"] = request.strength
    return out
