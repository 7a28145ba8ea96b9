"""Replicate through the official `replicate` client: official models by name (`Prefer: wait`, then
polling), community models by version (billed by `metrics.predict_time` x the hardware rate), cancel on
timeout, outputs downloaded at once (Replicate deletes API outputs after an hour).

The client retries only idempotent requests (its polls) on 429/503/504; creates are retried by the
broker, which honours Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from ..errors import (
    BadProviderResponse,
    ContentRejected,
    MissingExtra,
    ModelNotFound,
    OutcomeUnknown,
    ProviderUnavailable,
)
from ..inputs import data_url, white_mask
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage, mark_submitted, sampling_fields
from .http import POLL_RETRIES, HttpProvider, status_error
from .offering import Offering, request_size

if TYPE_CHECKING:
    import httpx

RATIOS = {"1024x1024": "1:1", "1344x768": "16:9", "768x1344": "9:16", "1152x896": "4:3", "896x1152": "3:4",
          "1216x832": "3:2", "832x1216": "2:3"}
TERMINAL = {"succeeded", "failed", "canceled", "aborted"}


class ReplicateProvider(HttpProvider):
    name = "replicate"
    api_key_env = "REPLICATE_API_TOKEN"
    default_base_url = "https://api.replicate.com"

    def _input(self, request: ImageRequest, offering: Offering) -> dict[str, Any]:
        w, h = request_size(request, offering)
        caps = offering.capabilities
        inp: dict[str, Any] = {"prompt": request.prompt}
        sized_by_input = ((request.is_edit and caps.edit is not None and caps.edit.output_size != "asked")
                          or (bool(request.control) and caps.control_size == "input"))
        if caps.size_rule is not None and not sized_by_input:
            inp |= {"width": w, "height": h}
        elif not sized_by_input:
            inp["aspect_ratio"] = RATIOS[f"{w}x{h}"]
        if caps.max_n > 1:
            inp["num_outputs"] = request.n
        steps = str(offering.settings.get("steps_field", "num_inference_steps"))   # FLUX [pro] models: steps
        inp |= sampling_fields(request, offering, steps=steps,  # SD-style models, else FLUX
                               guidance="guidance_scale" if caps.negative_prompt else "guidance")
        if request.output_format in caps.output_formats and len(caps.output_formats) > 1:
            inp["output_format"] = "jpg" if request.output_format == "jpeg" else request.output_format
        for i, a in enumerate(request.adapters[:2]):  # flux-dev-lora: lora_weights + extra_lora
            prefix = "" if i == 0 else "extra_"
            inp[f"{prefix}lora{'_weights' if i == 0 else ''}"] = a.ref
            inp[f"{prefix}lora_scale"] = a.scale
        if request.is_edit:
            inp |= _edit_input(request, offering)
        if request.control:   # FLUX Canny/Depth: `control_image`, the source they make the edges/depth from
            inp["control_image"] = request.control[0].sent_image(caps.control_input).data_url()
        fixed = offering.settings.get("fixed_input") or {}
        return inp | dict(fixed) | request.extra.get(self.name, {})  # type: ignore[call-overload]

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        try:
            import httpx  # the replicate client's own HTTP library (httpx 0.x), whose errors it raises
            import replicate
            from replicate.exceptions import ModelError, ReplicateError
        except ImportError:
            raise MissingExtra("replicate", "replicate") from None
        where: dict[str, Any] = {"provider": self.name, "offering": offering.id}
        failed: list[httpx.Headers] = []

        async def remember(resp: httpx.Response) -> None:  # the client's errors drop the headers
            if resp.status_code >= 400:
                failed.append(resp.headers)

        base = self.base_url_for(offering)  # the client polls by id there, never at a URL the answer names
        client = replicate.Client(api_token=ctx.api_key, base_url=base, event_hooks={"response": [remember]})
        inp = self._input(request, offering)
        version = offering.settings.get("version")
        wait = max(1, min(60, int(ctx.timeout_s)))
        mark_submitted()  # once sent, a lost answer is an unknown outcome (maybe billed), not a resubmit
        try:
            if version:
                pred = await client.predictions.async_create(version=str(version), input=inp, wait=wait)
            else:
                owner, name = offering.model.split("/", 1)
                pred = await client.models.predictions.async_create(model=(owner, name), input=inp, wait=wait)
            where["request_id"] = pred.id
            interval = self.settings.poll_interval_s or client.poll_interval
            try:
                failures = 0
                while pred.status not in TERMINAL:
                    await asyncio.sleep(interval)
                    try:
                        await pred.async_reload()
                        failures = 0
                    except (httpx.TransportError, ReplicateError) as exc:  # poll again, never resubmit
                        if isinstance(exc, ReplicateError) and (exc.status or 500) < 500 and exc.status != 429:
                            raise
                        failures += 1
                        if failures > POLL_RETRIES:
                            raise OutcomeUnknown(f"polling kept failing: {type(exc).__name__}", **where) from None
            except asyncio.CancelledError:  # the broker's timeout: stop paying for it
                with contextlib.suppress(Exception):
                    await pred.async_cancel()
                raise
        except ReplicateError as exc:
            headers = failed[-1] if failed else httpx.Headers()
            raise status_error(exc.status or 500, f"{exc.title}: {exc.detail}", headers, **where) from None
        except ModelError as exc:  # raised by some client paths for failed predictions
            raise ProviderUnavailable(f"model error: {exc}", **where) from None
        except httpx.TransportError as exc:
            raise ProviderUnavailable(f"connection failed: {type(exc).__name__}", **where) from None
        except ValueError as exc:
            raise BadProviderResponse(f"malformed response: {type(exc).__name__}", **where) from None
        if pred.status != "succeeded":
            error = str(pred.error or pred.status)
            if "nsfw" in error.lower() or "safety" in error.lower():
                raise ContentRejected(f"Replicate: {error}", **where)
            if "not found" in error.lower():
                raise ModelNotFound(f"Replicate: {error}", **where)
            raise ProviderUnavailable(f"Replicate prediction {pred.status}: {error}", **where)
        outputs = pred.output if isinstance(pred.output, list) else [pred.output] if pred.output else []
        seeds = [None if request.seed is None else request.seed + i for i in range(len(outputs))]
        images = [RawImage(await self.download(url, where, base_url=base), seed)
                  for url, seed in zip(outputs, seeds, strict=True)]
        usage: dict[str, Any] = {"images": len(images), "width": inp.get("width"),
                                 "height": inp.get("height")}
        if pred.metrics and pred.metrics.get("predict_time") is not None:
            usage["predict_time_s"] = pred.metrics["predict_time"]
        return ProviderResult(images, usage, pred.id, {k: "<data: URI>" if str(v).startswith("data:") else v
                                                       for k, v in inp.items() if k != "prompt"})


def _edit_input(request: ImageRequest, offering: Offering) -> dict[str, Any]:
    """The init image under the model's own name for it (`image`, or Kontext's `input_image` with the
    input's aspect ratio), the mask as `mask` (white = change), img2img's `prompt_strength`; files as data:
    URIs (Replicate recommends them under 1 MB, its Files API above: not built yet)."""
    field = str(offering.settings.get("edit_input", "image"))
    out: dict[str, Any] = {field: request.images[0].data_url()}
    if field == "input_image":
        out["aspect_ratio"] = "match_input_image"
    if request.mask is not None:
        out["mask"] = data_url(white_mask(request.mask))
    edit = offering.capabilities.edit
    if edit is not None and edit.strength and request.strength is not None:
        out["prompt_strength"] = request.strength
    return out
