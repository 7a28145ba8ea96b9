"""ComfyUI (the canvas rung): an API-format workflow template with bindings for prompt, negative,
seed, size, steps and guidance, and for edits the init image, references and mask (uploaded with
`/upload/image` under names made from their hashes, bound to the graph's LoadImage and LoadImageMask
nodes) and the strength (the sampler's `denoise`); progress over the websocket (aiohttp, the [comfyui]
extra) with a polling fallback; GPU-seconds from the history timestamps; interrupt and dequeue on
timeout."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import secrets
import uuid
from pathlib import Path
from typing import Any

from ..errors import BadProviderResponse, ProviderError, ProviderUnavailable
from ..inputs import white_mask
from ..types import ImageRequest
from .base import CallContext, ProviderResult, RawImage
from .http import HttpProvider
from .offering import Offering, request_size

SAMPLERS = ("KSampler", "KSamplerAdvanced")


def infer_bindings(graph: dict[str, Any]) -> dict[str, str]:
    """Follow the sampler's links: positive/negative text encoders, the empty latent, its own seed."""
    sampler_id = next((k for k, n in graph.items() if n.get("class_type") in SAMPLERS), None)
    if sampler_id is None:
        return {}
    inputs = graph[sampler_id]["inputs"]
    out = {"seed": f"{sampler_id}.inputs.{'noise_seed' if 'noise_seed' in inputs else 'seed'}",
           "steps": f"{sampler_id}.inputs.steps", "guidance": f"{sampler_id}.inputs.cfg"}
    for key, link in (("prompt", "positive"), ("negative", "negative")):
        if isinstance(inputs.get(link), list):
            out[key] = f"{inputs[link][0]}.inputs.text"
    if isinstance(inputs.get("latent_image"), list):
        node = inputs["latent_image"][0]
        if graph.get(node, {}).get("class_type") == "EmptyLatentImage":
            out |= {"width": f"{node}.inputs.width", "height": f"{node}.inputs.height",
                    "batch": f"{node}.inputs.batch_size"}
    if "denoise" in inputs:
        out["strength"] = f"{sampler_id}.inputs.denoise"
    loads = sorted((k for k, n in graph.items() if n.get("class_type") == "LoadImage"), key=_node_order)
    for i, node in enumerate(loads):
        out["image" if i == 0 else f"image_{i + 1}"] = f"{node}.inputs.image"
    mask = next((k for k, n in graph.items() if n.get("class_type") == "LoadImageMask"), None)
    if mask is not None:
        out |= {"mask": f"{mask}.inputs.image", "mask_channel": f"{mask}.inputs.channel"}
    return out


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 30, node_id)


def build_graph(template: dict[str, Any], bindings: dict[str, str], values: dict[str, Any]) -> dict[str, Any]:
    graph = copy.deepcopy(template)
    for key, value in values.items():
        if value is None or key not in bindings:
            continue
        node, _, path = bindings[key].partition(".")
        target = graph[node]
        *parents, leaf = path.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return graph


def node_errors_text(errors: dict[str, Any]) -> str:
    parts = []
    for node, e in errors.items():
        for err in e.get("errors", []):
            parts.append(f"node {node} ({e.get('class_type')}): {err.get('type')}: {err.get('details')}")
    return "; ".join(parts)


class ComfyUIProvider(HttpProvider):
    name = "comfyui"

    def _option(self, offering: Offering, key: str) -> Any:
        return self.settings.options.get(key) or offering.settings.get(key)

    def availability(self, offering: Offering) -> str | None:
        if not self.settings.enabled:
            return "provider comfyui disabled in the policy"
        if not self.base_url_for(offering):
            return "no ComfyUI server configured: set providers.comfyui.base_url"
        workflow = self._option(offering, "workflow")
        if not workflow:
            return "no workflow: set providers.comfyui.options.workflow (an API-format JSON file)"
        if not Path(str(workflow)).expanduser().is_file():
            return f"workflow file {workflow} not found"
        return None

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        base = self.base_url_for(offering) or ""
        where: dict[str, Any] = {"provider": self.name, "offering": offering.id}
        template = json.loads(Path(str(self._option(offering, "workflow"))).expanduser().read_text())
        bindings = self._option(offering, "bindings") or infer_bindings(template)
        w, h = request_size(request, offering)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**63)
        values = {"prompt": request.prompt, "negative": request.negative_prompt, "seed": seed, "width": w,
                  "height": h, "steps": request.steps, "guidance": request.guidance_scale, "batch": request.n}
        if request.is_edit:
            values |= await self._upload_inputs(base, request, bindings, where)
        graph = build_graph(template, bindings, values)
        client_id, prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
        where["request_id"] = prompt_id
        try:
            await self._run(base, graph, client_id, prompt_id, ctx, where)
        except asyncio.CancelledError:  # the broker's timeout: free the GPU
            with contextlib.suppress(Exception):
                await self.send("POST", f"{base}/interrupt", where=where, json={"prompt_id": prompt_id}, timeout=5)
                await self.send("POST", f"{base}/queue", where=where, json={"delete": [prompt_id]}, timeout=5)
            raise
        record = self.json(await self.send("GET", f"{base}/history/{prompt_id}", where=where), where)
        return await self._collect(base, record.get(prompt_id) or {}, seed, w, h, where)

    async def _upload_inputs(self, base: str, request: ImageRequest, bindings: dict[str, str],
                             where: dict[str, Any]) -> dict[str, Any]:
        """Each input image (and the mask, white = change, read from its red channel) uploaded into the
        server's input folder, named by its hash (a repeat is the same file), as the values to bind."""
        names = ["image", *(f"image_{i + 1}" for i in range(1, len(request.images)))]
        missing = [n for n in names + (["mask"] if request.mask else []) if n not in bindings]
        if missing:
            raise ProviderError(f"the workflow has no node for {', '.join(missing)} (LoadImage for images, "
                                "LoadImageMask for the mask): add one, or bind it in "
                                "providers.comfyui.options.bindings", **where)
        files = [(n, img.sha256[:32] + "." + ("jpg" if img.format == "jpeg" else img.format), img.data, img.mime)
                 for n, img in zip(names, request.images, strict=True)]
        if request.mask is not None:
            data = white_mask(request.mask)
            files.append(("mask", f"mask-{hashlib.sha256(data).hexdigest()[:32]}.png", data, "image/png"))
        values: dict[str, Any] = {"strength": request.strength, "mask_channel": "red" if request.mask else None}
        for binding, filename, data, mime in files:
            resp = await self.send("POST", f"{base}/upload/image", where=where, submit=False,
                                   files={"image": (filename, data, mime)},
                                   data={"type": "input", "overwrite": "true"})
            answer = self.json(resp, where)
            name = answer.get("name") if isinstance(answer, dict) else None
            if not isinstance(name, str) or not name:
                raise BadProviderResponse("/upload/image answered without a name", **where)
            values[binding] = f"{answer['subfolder']}/{name}" if answer.get("subfolder") else name
        return values

    async def _run(self, base: str, graph: dict[str, Any], client_id: str, prompt_id: str, ctx: CallContext,
                   where: dict[str, Any]) -> None:
        try:
            import aiohttp
        except ImportError:
            aiohttp = None  # type: ignore[assignment]
        submitted = False
        if aiohttp is not None:
            ws_url = base.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
            try:
                async with aiohttp.ClientSession() as session, session.ws_connect(
                        ws_url, timeout=aiohttp.ClientWSTimeout(ws_close=10)) as ws:
                    await self._submit(base, graph, client_id, prompt_id, where)
                    submitted = True
                    if await self._listen(ws, prompt_id, ctx, where):
                        return
            except aiohttp.ClientError:
                pass  # no websocket (a proxy without upgrade, say): poll instead
        if not submitted:
            await self._submit(base, graph, client_id, prompt_id, where)

        async def finished() -> bool | None:
            r = await self.send("GET", f"{base}/history/{prompt_id}", where=where)
            return True if self.json(r, where).get(prompt_id) else None

        await self.poll(finished, interval=self.settings.poll_interval_s or 0.5, deadline_s=ctx.timeout_s,
                        where=where)

    async def _submit(self, base: str, graph: dict[str, Any], client_id: str, prompt_id: str,
                      where: dict[str, Any]) -> None:
        resp = await self.send("POST", f"{base}/prompt", where=where, accept=(400,),
                               json={"prompt": graph, "client_id": client_id, "prompt_id": prompt_id})
        if resp.status_code == 400:  # validation: name the node, never retry
            try:
                body = resp.json()
                detail = node_errors_text(body.get("node_errors") or {}) or body["error"]["message"]
            except (ValueError, KeyError, TypeError, AttributeError):
                detail = resp.text[:300]
            raise ProviderError(f"ComfyUI rejected the workflow: {detail}", status=400, **where)
        answer = self.json(resp, where)
        if answer.get("node_errors"):
            raise ProviderError(f"ComfyUI skipped outputs: {node_errors_text(answer['node_errors'])}",
                                status=200, **where)

    async def _listen(self, ws: Any, prompt_id: str, ctx: CallContext, where: dict[str, Any]) -> bool:
        """True when the prompt finished; False if the socket closed first (then we poll)."""
        async for msg in ws:
            if msg.type.name != "TEXT":  # binary preview frames and the like
                continue
            event = json.loads(msg.data)
            data = event.get("data") or {}
            if data.get("prompt_id") not in (prompt_id, None):
                continue
            kind = event.get("type")
            if kind == "progress" and ctx.progress is not None:
                ctx.progress(int(data.get("value", 0)), int(data.get("max", 0)))
            elif kind == "execution_error":
                exc_type = str(data.get("exception_type", ""))
                msg_text = f"ComfyUI node {data.get('node_id')} ({data.get('node_type')}): {exc_type}: " \
                           f"{data.get('exception_message', '')}"
                cls = ProviderUnavailable if "OutOfMemory" in exc_type else ProviderError
                raise cls(msg_text, **where)
            elif kind == "execution_interrupted":
                raise ProviderUnavailable("ComfyUI interrupted the prompt", **where)
            elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return True
        return False

    async def _collect(self, base: str, record: dict[str, Any], seed: int, w: int, h: int,
                       where: dict[str, Any]) -> ProviderResult:
        status = record.get("status") or {}
        if status.get("status_str") == "error":
            raise ProviderError(f"ComfyUI run failed: {status.get('messages', [])[-1:]}", **where)
        refs = [img for out in (record.get("outputs") or {}).values() for img in out.get("images", [])]
        images = []
        for i, ref in enumerate(refs):
            params = {"filename": ref.get("filename"), "subfolder": ref.get("subfolder", ""),
                      "type": ref.get("type", "output")}
            resp = await self.send("GET", f"{base}/view", where=where, params=params)
            images.append(RawImage(resp.content, seed + i))
        stamps = {m[0]: m[1].get("timestamp") for m in status.get("messages", []) if len(m) == 2}
        usage: dict[str, Any] = {"images": len(images), "width": w, "height": h, "device": "cuda"}
        if stamps.get("execution_start") and stamps.get("execution_success"):
            usage["gpu_seconds"] = (stamps["execution_success"] - stamps["execution_start"]) / 1000
        else:
            raise BadProviderResponse("ComfyUI history has no execution timestamps", **where)
        cached = next((m[1].get("nodes") for m in status.get("messages", []) if m[0] == "execution_cached"), [])
        usage["cached_nodes"] = len(cached or [])
        return ProviderResult(images, usage, where.get("request_id"), {"seed": seed, "size": f"{w}x{h}"})
