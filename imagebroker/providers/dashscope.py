"""Alibaba Cloud Model Studio (DashScope): Wan text-to-image as an async task (`POST .../services/aigc/
text2image/image-synthesis` with `X-DashScope-Async: enable`, then `GET .../tasks/{id}`), Qwen-Image
synchronously (`POST .../services/aigc/multimodal-generation/generation`). Sizes are written `W*H`. The
region is the host (Singapore, Beijing, Virginia: `providers.dashscope.region: cn | us`), and keys are
per region: a key from another region is refused. Errors are flat `{code, message, request_id}`;
`DataInspectionFailed` is a moderation refusal. Only images made are billed; a task may succeed with some
of its results failed, and `usage.image_count` counts the others."""

from __future__ import annotations

from typing import Any

import httpx2

from ..errors import (
    BadProviderResponse,
    ContentRejected,
    ModelNotFound,
    ProviderError,
    ProviderUnavailable,
)
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage, mark_submitted
from .http import HttpProvider, status_error
from .offering import Offering, request_size

REFUSED = ("DataInspectionFailed", "IPInfringementSuspect")


class DashScopeProvider(HttpProvider):
    name = "dashscope"
    api_key_env = "DASHSCOPE_API_KEY"
    default_base_url = "https://dashscope-intl.aliyuncs.com/api/v1"

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where: dict[str, Any] = {"provider": self.name, "offering": offering.id}
        w, h = request_size(request, offering)
        parameters: dict[str, Any] = {"size": f"{w}*{h}", "watermark": False}
        if request.seed is not None:
            parameters["seed"] = request.seed
        negative = request.negative_prompt if offering.capabilities.negative_prompt else None
        base, headers = self.base_url_for(offering), self.headers(ctx.api_key)
        if offering.settings.get("api") == "sync":   # Qwen-Image: one image, answered at once
            if negative:
                parameters["negative_prompt"] = negative
            parameters |= request.extra.get(self.name, {})
            body = {"model": offering.model, "parameters": parameters,
                    "input": {"messages": [{"role": "user", "content": [{"text": request.prompt}]}]}}
            data = await self._post(f"{base}/services/aigc/multimodal-generation/generation", body, headers,
                                    ctx, where)
            content = _dig(data, "output", "choices", 0, "message", "content") or []
            urls = [c["image"] for c in content if isinstance(c, dict) and c.get("image")]
        else:                                        # Wan: a task, polled
            parameters |= {"n": request.n} | request.extra.get(self.name, {})  # n defaults to 4: always sent
            body = {"model": offering.model, "parameters": parameters,
                    "input": {"prompt": request.prompt, **({"negative_prompt": negative} if negative else {})}}
            task = await self._post(f"{base}/services/aigc/text2image/image-synthesis", body,
                                    headers | {"X-DashScope-Async": "enable"}, ctx, where)
            task_id = _dig(task, "output", "task_id")
            if not task_id:
                raise BadProviderResponse("task submitted without output.task_id", **where)
            where["request_id"] = task_id
            mark_submitted(str(task_id))
            data = await self._task(f"{base}/tasks/{task_id}", headers, ctx, where)
            results = _dig(data, "output", "results") or []
            urls = [r["url"] for r in results if isinstance(r, dict) and r.get("url")]
            if results and not urls:
                first = results[0] if isinstance(results[0], dict) else {}
                raise _failure(str(first.get("code", "")), str(first.get("message", "")), where)
        images = [RawImage(await self.download(u, where, base_url=base), None) for u in urls]
        made = _dig(data, "usage", "image_count")
        usage = {"images": made if isinstance(made, int) and not isinstance(made, bool) else len(images),
                 "width": w, "height": h}
        return ProviderResult(images, usage, data.get("request_id"),
                              {"model": offering.model, **parameters})

    async def _post(self, url: str, body: dict[str, Any], headers: dict[str, str], ctx: CallContext,
                    where: dict[str, Any]) -> dict[str, Any]:
        resp = await self.send("POST", url, where=where, json=body, headers=headers, timeout=ctx.timeout_s,
                               accept=(400, 403))
        if resp.status_code >= 400:
            try:
                raise _error(resp, resp.json(), where)
            except ValueError:
                raise _error(resp, None, where) from None
        data = self.json(resp, where)
        if not isinstance(data, dict):
            raise BadProviderResponse("answer is not a JSON object", **where)
        return data

    async def _task(self, url: str, headers: dict[str, str], ctx: CallContext,
                    where: dict[str, Any]) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            data = self.json(await self.send("GET", url, where=where, headers=headers), where)
            status = _dig(data, "output", "task_status")
            if status == "SUCCEEDED":
                return data
            if status == "FAILED":
                out = data.get("output") or {}
                raise _failure(str(out.get("code", "")), str(out.get("message", "")), where)
            if status == "UNKNOWN":   # an id it does not know (or one older than 24 h): 200, not 404
                raise ModelNotFound("DashScope does not know the task (expired or unknown id)", **where)
            if status == "CANCELED":
                raise ProviderError("DashScope: the task was cancelled", **where)
            return None

        return await self.poll(check, interval=self.settings.poll_interval_s or 1.0, deadline_s=ctx.timeout_s,
                               where=where)


def _dig(data: Any, *path: str | int) -> Any:
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _failure(code: str, message: str, where: dict[str, Any]) -> ProviderError:
    if code in REFUSED:
        return ContentRejected(f"DashScope refused: {code}: {message[:200]}", **where)
    return ProviderUnavailable(f"DashScope task failed: {code}: {message[:200]}", **where)


def _error(resp: httpx2.Response, data: Any, where: dict[str, Any]) -> ProviderError:
    code = str(data.get("code", "")) if isinstance(data, dict) else ""
    if code in REFUSED:
        return ContentRejected(f"DashScope refused: {code}", status=resp.status_code, **where)
    if code == "InvalidParameter" and "model not exist" in resp.text.lower():
        return ModelNotFound(f"HTTP {resp.status_code}: {resp.text[:300]}", status=resp.status_code, **where)
    return status_error(resp.status_code, resp.text, resp.headers, **where)
