"""ComfyUI (the canvas rung) over its HTTP and websocket API, as a real ComfyUI 0.8.0 server answers.

An API-format workflow (the offering's own `settings.workflow` before the provider-wide `options.workflow`)
gets the request's fields through bindings found by following the sampler's links (`graph.infer_bindings`)
or named in `bindings`; a graph where none is found is refused before anything runs. For edits the inputs
are uploaded (`/upload/image`, named by their hash) and bound to LoadImage / LoadImageMask nodes.

One or more servers (`base_url`, or `base_urls` for a pool): a call goes to the least loaded healthy one
and fails over to the next while nothing was queued. Progress comes over the websocket (aiohttp, the
[comfyui] extra; connected within `WS_CONNECT_S`, else the call polls the history), and failures read
the same on both paths. A 200 with `node_errors` (ComfyUI runs the valid part) is stopped and fails;
a timed-out or cancelled run is interrupted and dequeued. Every run's server seconds are its cost: from
the history's timestamps, less the model loads seen on the websocket, at the rate of the device the server
reports (`/system_stats`); a run that fails or is cancelled reports the seconds it used."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import BadProviderResponse, ProviderError, ProviderUnavailable, RateLimited
from ...inputs import white_mask
from ...types import ImageRequest
from ..base import (
    CallContext,
    OfferingState,
    Provider,
    ProviderResult,
    RawImage,
    mark_submitted,
    report_usage,
)
from ..catalog import Catalog
from ..http import HttpProvider
from ..offering import Offering, request_size
from .fallback import missing_controls, missing_inputs, run_locally
from .graph import (
    LOADERS,
    build_graph,
    cached_nodes,
    history_failure,
    infer_bindings,
    prompt_error_text,
    request_values,
    run_failure,
    saved_images,
    server_seconds,
)
from .pool import Server, ServerPool

WS_CONNECT_S = 5.0
FETCH_FAILED = "the finished run's images could not be fetched"
STOP_WAIT_S = 1.0   # after an interrupt, how long to wait for the history to say what the run used


class _SkippedOutputs(ProviderError):
    """A 200 from POST /prompt with node_errors: ComfyUI runs the valid part, which must be stopped."""


class _Run:
    """What one run on one server learned besides its history: the model loads seen on the websocket."""

    def __init__(self, graph: dict[str, Any]) -> None:
        self.graph, self.load_s = graph, 0.0
        self._node: str | None = None
        self._since = 0.0

    def executing(self, node: str | None) -> None:
        now = time.monotonic()
        if self._node is not None and self.graph.get(self._node, {}).get("class_type") in LOADERS:
            self.load_s += now - self._since
        self._node, self._since = node, now


class ComfyUIProvider(HttpProvider):
    name = "comfyui"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._pools: dict[tuple[str, ...], ServerPool] = {}
        self._peer: Callable[[str], Provider] | None = None
        self._catalog: Catalog | None = None

    def connect(self, peer: Callable[[str], Provider], catalog: Catalog) -> None:
        self._peer, self._catalog = peer, catalog

    def _option(self, offering: Offering, key: str) -> Any:
        return offering.settings.get(key) or self.settings.options.get(key)

    def _urls(self, offering: Offering) -> list[str]:
        urls = [u.rstrip("/") for u in self.settings.base_urls]
        return urls or [u for u in [self.base_url_for(offering)] if u]

    def pool(self, offering: Offering) -> ServerPool:
        key = tuple(self._urls(offering))
        if key not in self._pools:
            self._pools[key] = ServerPool(list(key), self._status)
        return self._pools[key]

    async def _status(self, url: str, want_device: bool) -> tuple[int, str | None]:
        where: dict[str, Any] = {"provider": self.name}
        queue = self.json(await self.send("GET", f"{url}/prompt", where=where, timeout=5), where)
        device = None
        if want_device:
            stats = self.json(await self.send("GET", f"{url}/system_stats", where=where, timeout=5), where)
            devices = stats.get("devices") or [{}] if isinstance(stats, dict) else [{}]
            device = str(devices[0].get("type") or "cuda")
        return int((queue.get("exec_info") or {}).get("queue_remaining", 0)), device

    def availability(self, offering: Offering) -> str | None:
        if not self.settings.enabled:
            return "provider comfyui disabled in the policy"
        if not self._urls(offering):
            return "no ComfyUI server configured: set providers.comfyui.base_url (or base_urls, for a pool)"
        workflow = self._option(offering, "workflow")
        if not workflow:
            return "no workflow: set providers.comfyui.options.workflow (an API-format JSON file)"
        if not Path(str(workflow)).expanduser().is_file():
            return f"workflow file {workflow} not found"
        return None

    @property
    def state_epoch(self) -> int:
        """Changes when a server's device becomes known (the planner prices a CPU server at the CPU rate)."""
        return sum(s.device is not None for pool in self._pools.values() for s in pool.servers)

    def state(self, offering: Offering) -> OfferingState:
        pool = self._pools.get(tuple(self._urls(offering)))
        devices = {s.device for s in pool.servers if s.device} if pool else set()
        device = devices.pop() if len(devices) == 1 else None   # servers of mixed devices: priced as GPUs
        return OfferingState(unavailable=self.availability(offering), device=device)

    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        where: dict[str, Any] = {"provider": self.name, "offering": offering.id}
        template, bindings = self._workflow(offering, where)
        if not bindings:
            raise ProviderError("the workflow has no KSampler to bind the prompt, seed and size to: name them in "
                                "options.bindings (NODE.inputs.FIELD), or the request would be ignored", **where)
        if request.width and "width" not in bindings:
            raise ProviderError(f"the workflow has no EmptyLatentImage bound to width/height: {request.size} "
                                "cannot be made (an edit's size is its init image's); bind them in "
                                "options.bindings", **where)
        if request.n > 1 and "batch" not in bindings:
            raise ProviderError(f"n={request.n}: the workflow has no EmptyLatentImage batch_size to bind it to",
                                **where)
        missing_controls(request, bindings, where)
        pool, last = self.pool(offering), None
        for server in await pool.ranked():
            accepted: list[str] = []
            server.in_flight += 1
            try:
                result = await self._on(server, request, offering, template, bindings, ctx, dict(where), accepted)
            except (ProviderUnavailable, RateLimited) as exc:
                if accepted:     # queued there: it may be running, never sent to another server too
                    raise
                pool.failed(server)
                last = exc
                continue
            finally:
                server.in_flight -= 1
            pool.worked(server)
            return result
        if self._option(offering, "local_fallback") and self._peer is not None and self._catalog is not None:
            return await run_locally(self._peer("local"), self._catalog, self.settings.options, request, offering,
                                     template, bindings, ctx, where)
        raise last or ProviderUnavailable("no ComfyUI server answered", **where)

    def _workflow(self, offering: Offering, where: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """The workflow and its bindings, both from the offering's own settings or both from the provider's
        options (bindings written for one graph never bind another); every binding names a node there."""
        own = offering.settings.get("workflow")
        source = offering.settings if own else self.settings.options
        template = json.loads(Path(str(source.get("workflow"))).expanduser().read_text())
        bindings = source.get("bindings") or infer_bindings(template)
        for key, target in bindings.items():
            if str(target).partition(".")[0] not in template:
                raise ProviderError(f"binding {key}: {target} names no node of the workflow", **where)
        return template, bindings

    async def _on(self, server: Server, request: ImageRequest, offering: Offering, template: dict[str, Any],
                  bindings: dict[str, str], ctx: CallContext, where: dict[str, Any], accepted: list[str]
                  ) -> ProviderResult:
        base = server.url
        w, h = request_size(request, offering)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**63)
        values = request_values(request, (w, h), seed)
        used = {f"control.{c.kind}" for c in request.control}   # the workflow's other ControlNets hold nothing
        values |= {f"{k}.scale": 0.0 for k in bindings if k.startswith("control.") and k.count(".") == 1
                   and k not in used}
        if request.is_edit or request.control:
            values |= await self._upload_inputs(base, request, bindings, where)
        graph = build_graph(template, bindings, values)
        client_id, prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
        where["request_id"] = prompt_id
        run = _Run(graph)
        device = server.device or "cuda"
        try:
            await self._run(base, graph, client_id, prompt_id, ctx, where, run, accepted)
        except asyncio.CancelledError:  # the broker's timeout or the caller: free the server
            with contextlib.suppress(Exception):
                await self._stop(base, prompt_id, where, device, run)
            raise
        except ProviderError as exc:   # what the failed run used; a partial run stopped first
            with contextlib.suppress(Exception):
                if isinstance(exc, _SkippedOutputs):
                    await self._stop(base, prompt_id, where, device, run)
                else:   # the real server writes the history after the failure's event: wait a moment
                    await self._used(base, prompt_id, where, device, run, wait=True)
            raise
        # the run is done (and paid for): a failure from here is never a reason to run it again
        record = await self.again(lambda: self._history(base, prompt_id, where), where, FETCH_FAILED)
        return await self._collect(base, record, seed, (w, h), device, run, where)

    async def _history(self, base: str, prompt_id: str, where: dict[str, Any]) -> dict[str, Any]:
        return self.json(await self.send("GET", f"{base}/history/{prompt_id}", where=where), where).get(prompt_id) or {}

    async def _upload_inputs(self, base: str, request: ImageRequest, bindings: dict[str, str],
                             where: dict[str, Any]) -> dict[str, Any]:
        """Each input image (the mask, white = change, read from its red channel; each control image) uploaded
        into the server's input folder, named by its hash (a repeat is the same file), as the values to bind."""
        names = missing_inputs(request, bindings, where) if request.is_edit else []
        images = [*zip(names, request.images, strict=True), *((f"control.{c.kind}", c.image) for c in request.control)]
        files = [(n, img.sha256[:32] + "." + ("jpg" if img.format == "jpeg" else img.format), img.data, img.mime)
                 for n, img in images]
        if request.mask is not None:
            data = white_mask(request.mask)
            files.append(("mask", f"mask-{hashlib.sha256(data).hexdigest()[:32]}.png", data, "image/png"))
        values: dict[str, Any] = {"mask_channel": "red" if request.mask else None}
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
                   where: dict[str, Any], run: _Run, accepted: list[str]) -> None:
        ws = session = None
        try:
            try:
                import aiohttp
            except ImportError:
                aiohttp = None  # type: ignore[assignment]
            if aiohttp is not None:
                session = aiohttp.ClientSession()
                ws_url = base.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
                try:
                    async with asyncio.timeout(WS_CONNECT_S):   # the upgrade itself, not the close
                        ws = await session.ws_connect(ws_url, timeout=aiohttp.ClientWSTimeout(ws_close=10))
                except (aiohttp.ClientError, TimeoutError, OSError):
                    ws = None   # no websocket (a proxy without upgrade, say): poll instead
            await self._submit(base, graph, client_id, prompt_id, where, accepted)
            if ws is not None and await self._listen(ws, prompt_id, ctx, where, run):
                return
        finally:
            if ws is not None:
                await ws.close()
            if session is not None:
                await session.close()

        async def finished() -> dict[str, Any] | None:
            r = await self.send("GET", f"{base}/history/{prompt_id}", where=where)
            return self.json(r, where).get(prompt_id) or None

        record = await self.poll(finished, interval=self.settings.poll_interval_s or 0.5, deadline_s=ctx.timeout_s,
                                 where=where)
        if failure := history_failure(record):   # read as the websocket would have said it
            text, retry = failure
            raise (ProviderUnavailable if retry else ProviderError)(text, **where)

    async def _submit(self, base: str, graph: dict[str, Any], client_id: str, prompt_id: str,
                      where: dict[str, Any], accepted: list[str]) -> None:
        resp = await self.send("POST", f"{base}/prompt", where=where, accept=(400,),
                               json={"prompt": graph, "client_id": client_id, "prompt_id": prompt_id})
        if resp.status_code == 400:  # validation: name the node, never retry
            try:
                detail = prompt_error_text(resp.json())
            except ValueError:
                detail = resp.text[:300]
            raise ProviderError(f"ComfyUI rejected the workflow: {detail}", status=400, **where)
        answer = self.json(resp, where)
        accepted.append(prompt_id)
        mark_submitted(prompt_id)
        if answer.get("node_errors"):   # queued anyway: ComfyUI runs the valid outputs; stop it
            raise _SkippedOutputs(f"ComfyUI skipped outputs: {prompt_error_text(answer)}", status=200, **where)

    async def _listen(self, ws: Any, prompt_id: str, ctx: CallContext, where: dict[str, Any], run: _Run) -> bool:
        """True when the prompt finished; False if the socket closed first (then we poll)."""
        async for msg in ws:
            if msg.type.name != "TEXT":  # binary preview frames and the like
                continue
            event = json.loads(msg.data)
            data = event.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            kind = event.get("type")
            if kind == "progress" and ctx.progress is not None:
                ctx.progress(int(data.get("value", 0)), int(data.get("max", 0)))
            elif (failure := run_failure(kind, data)) is not None:
                text, retry = failure
                raise (ProviderUnavailable if retry else ProviderError)(text, **where)
            elif kind == "executing":
                run.executing(data.get("node"))
                if data.get("node") is None:
                    return True
        return False

    async def _stop(self, base: str, prompt_id: str, where: dict[str, Any], device: str, run: _Run) -> None:
        """Interrupt the prompt if it runs, take it off the queue if it waits, and report what it used."""
        await self.send("POST", f"{base}/interrupt", where=where, json={"prompt_id": prompt_id}, timeout=5,
                        submit=False)
        await self.send("POST", f"{base}/queue", where=where, json={"delete": [prompt_id]}, timeout=5, submit=False)
        await self._used(base, prompt_id, where, device, run, wait=True)

    async def _used(self, base: str, prompt_id: str, where: dict[str, Any], device: str, run: _Run,
                    wait: bool) -> None:
        """The server seconds a run that returns no images used, from its history (waiting a moment for
        the record of an interrupted run): reported as the attempt's cost."""
        end = time.monotonic() + (STOP_WAIT_S if wait else 0)
        while True:
            record = self.json(await self.send("GET", f"{base}/history/{prompt_id}", where=where, timeout=5),
                               where).get(prompt_id)
            if record or time.monotonic() >= end:
                break
            await asyncio.sleep(0.1)
        seconds = server_seconds(record) if record else None
        if seconds is not None:
            report_usage({"images": 0, "gpu_seconds": round(max(0.0, seconds - run.load_s), 6), "device": device,
                          "load_seconds": round(run.load_s, 3), "prompt_id": prompt_id})

    async def _collect(self, base: str, record: dict[str, Any], seed: int, size: tuple[int, int], device: str,
                       run: _Run, where: dict[str, Any]) -> ProviderResult:
        if (record.get("status") or {}).get("status_str") == "error":
            text, retry = history_failure(record) or ("ComfyUI run failed", False)
            raise (ProviderUnavailable if retry else ProviderError)(text, **where)
        seconds = server_seconds(record)
        if seconds is None:
            raise BadProviderResponse("ComfyUI history has no execution timestamps", **where)
        refs = saved_images(record)
        usage: dict[str, Any] = {"images": len(refs), "width": size[0], "height": size[1], "device": device,
                                 "gpu_seconds": round(max(0.0, seconds - run.load_s), 6),
                                 "load_seconds": round(run.load_s, 3), "cached_nodes": cached_nodes(record)}
        report_usage(usage)   # what the run used, even if a download fails below
        images = []
        for i, ref in enumerate(refs):
            params = {"filename": ref.get("filename"), "subfolder": ref.get("subfolder", ""),
                      "type": ref.get("type", "output")}
            resp = await self.again(lambda p=params: self.send("GET", f"{base}/view", where=where, params=p), where,
                                    FETCH_FAILED)
            # one seed for the whole batch (ComfyUI draws a batch's noise from it): image 0 is that seed's
            images.append(RawImage(resp.content, seed if i == 0 else None))
        applied = {"seed": seed, "size": f"{size[0]}x{size[1]}", "server": base, "device": device,
                   "batch_seeds": "one seed for the batch" if len(images) > 1 else None}
        return ProviderResult(images, usage, where.get("request_id"), applied)
