"""Runway (gen4 image): `POST /v1/text_to_image` with a Bearer key and the required `X-Runway-Version`
header answers a task id; `GET /v1/tasks/{id}` is polled until SUCCEEDED (`output`: URLs that expire) or
FAILED (`failureCode`: `SAFETY.*` is a refusal). The size is asked as `ratio`, which Runway writes as the
pixel size itself (`1920:1080`). One image per call. Reference images (`referenceImages`, up to 3, data
URIs here) are how an edit is sent; gen4_image_turbo needs at least one. A task still running at the
deadline is cancelled (`DELETE /v1/tasks/{id}`) before the unknown outcome is reported."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..errors import BadProviderResponse, ContentRejected, OutcomeUnknown, ProviderError, ProviderUnavailable
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage, mark_submitted
from .http import HttpProvider
from .offering import Offering, request_size

VERSION = "2024-11-06"


class RunwayProvider(HttpProvider):
    name = "runway"
    api_key_env = "RUNWAYML_API_SECRET"
    default_base_url = "https://api.dev.runwayml.com"

    def headers(self, key: str | None) -> dict[str, str]:
        return {"X-Runway-Version": VERSION} | ({"Authorization": f"Bearer {key}"} if key else {})

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where: dict[str, Any] = {"provider": self.name, "offering": offering.id}
        w, h = request_size(request, offering)
        body: dict[str, Any] = {"model": offering.model, "promptText": request.prompt, "ratio": f"{w}:{h}"}
        if request.seed is not None:
            body["seed"] = request.seed
        if request.is_edit:
            body["referenceImages"] = [{"uri": img.data_url(), "tag": f"image{i}"}
                                       for i, img in enumerate(request.images)]
        body.update(request.extra.get(self.name, {}))
        base, headers = self.base_url_for(offering), self.headers(ctx.api_key)
        resp = await self.send("POST", f"{base}/v1/text_to_image", where=where, json=body, headers=headers,
                               timeout=ctx.timeout_s)
        task_id = (self.json(resp, where) or {}).get("id")
        if not task_id:
            raise BadProviderResponse("text_to_image answered without a task id", **where)
        where["request_id"] = task_id
        mark_submitted(str(task_id))
        url = f"{base}/v1/tasks/{task_id}"

        async def check() -> dict[str, Any] | None:
            task = self.json(await self.send("GET", url, where=where, headers=headers), where)
            status = task.get("status") if isinstance(task, dict) else None
            if status == "SUCCEEDED":
                return task
            if status == "FAILED":
                code, why = str(task.get("failureCode") or ""), str(task.get("failure") or "")[:200]
                if code.startswith("SAFETY"):
                    raise ContentRejected(f"Runway refused: {code}: {why}", **where)
                raise ProviderUnavailable(f"Runway task failed: {code or 'no code'}: {why}", **where)
            if status == "CANCELLED":
                raise ProviderError("Runway: the task was cancelled", **where)
            return None

        try:
            task = await self.poll(check, interval=self.settings.poll_interval_s or 1.0,
                                   deadline_s=ctx.timeout_s, where=where)
        except (OutcomeUnknown, asyncio.CancelledError):
            with contextlib.suppress(Exception):   # stop what would otherwise finish and bill unseen
                await asyncio.shield(self.send("DELETE", url, where=where, headers=headers, submit=False))
            raise
        outputs = task.get("output") or []
        if not isinstance(outputs, list) or not outputs:
            raise BadProviderResponse("SUCCEEDED without output", **where)
        images = [RawImage(await self.download(u, where, base_url=base), request.seed) for u in outputs[:1]]
        applied = {k: (f"<{len(v)} reference image(s)>" if k == "referenceImages" else v)
                   for k, v in body.items() if k != "promptText"}
        return ProviderResult(images, {"images": len(images), "width": w, "height": h}, task_id, applied)
