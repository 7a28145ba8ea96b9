"""Fake ComfyUI (aiohttp), brought to what a real ComfyUI 0.8.0 answers (shared research/comfyui-real-server):

- `POST /prompt` validates against the node table (`comfyui_graph`) with the real 400 bodies; outputs that fail
  validation are dropped and the rest queued with a 200 carrying `node_errors`; `number` counts from 0;
- one worker runs the queue in order. Per run the websocket gets `execution_start`, `execution_cached`,
  `progress_state` and `executing` per node, `progress` only from samplers, `executed` per output node,
  `execution_success` and the final `executing null`; `status` on connect (with `sid`) and on every queue change;
- identical (sub)graphs are served from cache (the same file names, about no time); a checkpoint loads once;
- files are `{prefix}_{counter:05}_.png` from 00001 (a `/` in the prefix makes a subfolder), PreviewImage
  writes `temp` files; history records have `prompt` (with `create_time`), `outputs`, `status`, `meta`, also
  for failed and interrupted runs;
- `/view` honours `type` and `subfolder` (404 missing, 400 `..` or absolute, 403 outside); `/interrupt` stops
  only the prompt running (none given: whatever runs); `/queue` deletes pending items only; `/system_stats`
  names the device; `/upload/image`, `/object_info`, `GET /prompt`.

Steps: the generic `429`, `500`, `malformed`, `timeout` (samplers step slowly), `empty` (SaveImage saves
nothing), `broken` (files that are not PNGs); `nodeerror` (400: a checkpoint not in the list), `oom` (CUDA
out of memory at the sampler), `cpu_oom` (the CPU allocator's RuntimeError), `nows` (no websocket: poll),
`noupgrade` (the websocket upgrade is never answered), `view_down` (`/view` answers 503). Steps join with `+`
(`nows+oom`)."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import threading
import time
from typing import Any, ClassVar

from aiohttp import WSMsgType, web
from PIL import PngImagePlugin

from .comfyui_graph import (
    NODES,
    WORKFLOW,
    WORKFLOW_CONTROL,
    WORKFLOW_IMG2IMG,
    WORKFLOW_INPAINT,
    GraphError,
    NodeFailed,
    order,
    run_node,
    signature,
    validate,
)

OOM = {"oom": ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB."),
       "cpu_oom": ("RuntimeError", "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                                   "memory: you tried to allocate 4294967296 bytes.")}


def _ms() -> int:
    return int(time.time() * 1000)


class FakeComfyUI:
    name = "comfyui"
    key = ""
    prefix = ""
    unsupported: ClassVar[set[str]] = {"refuse", "badkey"}  # ComfyUI has no moderation and no authentication

    def __init__(self, script: list[str] | None = None, port: int = 0, *, device: str = "cuda",
                 load_s: float = 0.05, step_s: float = 0.005) -> None:
        self.script = list(script or ["ok"])
        self.device, self.load_s, self.step_s = device, load_s, step_s
        self.requests: list[dict[str, Any]] = []
        self.generations = 0
        self.number = 0                    # the server-wide prompt counter, from 0
        self.timeout_s = 30.0
        self.history: dict[str, Any] = {}
        self.files: dict[str, bytes] = {}  # "type/subfolder/filename" -> bytes
        # uploaded with /upload/image, by name; a fresh install's input folder has ComfyUI's example.png
        self.inputs: dict[str, bytes] = {"example.png": _example_png()}
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.interrupted: list[str] = []   # prompt ids the client asked to interrupt
        self.deleted: list[str] = []       # prompt ids the client asked to delete from the queue
        self.pending: list[dict[str, Any]] = []
        self.running: dict[str, Any] | None = None
        self._stop: set[str] = set()       # interrupts that took effect
        self._cache: dict[str, Any] = {}   # node signature -> outputs (and an output node's files)
        self._counters: dict[tuple[str, str], int] = {}
        self._port = port
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------
    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(middlewares=[_same_origin])
        for prefix in ("", "/api"):
            app.router.add_post(f"{prefix}/prompt", self.prompt)
            app.router.add_get(f"{prefix}/prompt", self.prompt_info)
            app.router.add_get(f"{prefix}/history/{{pid}}", self.get_history)
            app.router.add_get(f"{prefix}/history", self.all_history)
            app.router.add_get(f"{prefix}/view", self.view)
            app.router.add_post(f"{prefix}/interrupt", self.interrupt)
            app.router.add_post(f"{prefix}/queue", self.queue_post)
            app.router.add_get(f"{prefix}/queue", self.queue_get)
            app.router.add_get(f"{prefix}/system_stats", self.system_stats)
            app.router.add_get(f"{prefix}/object_info", self.object_info)
            app.router.add_get(f"{prefix}/ws", self.ws)
            app.router.add_post(f"{prefix}/upload/image", self.upload)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)   # a hung handler (noupgrade) ends too
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        self.base_url = self.url
        self._wake = asyncio.Event()
        self._worker = self._loop.create_task(self._work_queue())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> FakeComfyUI:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._worker.cancel()
            for sock in list(self.sockets.values()):
                await sock.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- the websocket --------------------------------------------------------------------------
    async def ws(self, request: web.Request) -> web.StreamResponse:
        step = set(self._step_now().split("+"))
        if "nows" in step:
            return web.Response(status=404)
        if "noupgrade" in step:   # accepted, never answered: the client's connect timeout must fire
            await asyncio.sleep(self.timeout_s)
            return web.Response(status=504)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        cid = request.query.get("clientId", "anon")
        self.sockets[cid] = sock
        await sock.send_json({"type": "status", "data": {"status": self._exec_info(), "sid": cid}})
        async for msg in sock:
            if msg.type == WSMsgType.CLOSE:
                break
        return sock

    def _step_now(self) -> str:
        return self.script[min(self.generations + 1, len(self.script)) - 1]

    def _exec_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": len(self.pending) + (self.running is not None)}}

    async def _send(self, cid: str | None, kind: str, data: dict[str, Any]) -> None:
        sock = self.sockets.get(cid or "")
        if sock is not None and not sock.closed:
            await sock.send_json({"type": kind, "data": data})

    async def _status(self) -> None:
        for sock in list(self.sockets.values()):   # every client, without sid
            if not sock.closed:
                await sock.send_json({"type": "status", "data": {"status": self._exec_info()}})

    # -- POST /prompt ---------------------------------------------------------------------------
    async def prompt(self, request: web.Request) -> web.Response:
        self.generations += 1
        step = self.script[min(self.generations, len(self.script)) - 1]
        raw = await request.read()
        self.requests.append({"path": request.path, "body": raw})
        if step == "429":
            return web.json_response({"error": "busy"}, status=429, headers={"Retry-After": "1"})
        if step == "500":
            return web.json_response({"error": "internal"}, status=500)
        if step == "malformed":
            return web.Response(text="{not json", content_type="application/json")
        body = json.loads(raw)
        if step == "nodeerror":  # the real shape (ComfyUI execution.validate_prompt)
            details = "ckpt_name: 'x.safetensors' not in (list of length 37)"
            error = {"type": "value_not_in_list", "message": "Value not in list", "details": details,
                     "extra_info": {"input_name": "ckpt_name", "input_config": None,
                                    "received_value": "x.safetensors"}}
            return web.json_response({
                "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                          "details": "", "extra_info": {}},
                "node_errors": {"4": {"errors": [error], "dependent_outputs": ["9"],
                                      "class_type": "CheckpointLoaderSimple"}}}, status=400)
        try:
            outputs, node_errors = validate(body.get("prompt"), self.inputs)
        except GraphError as exc:
            return web.json_response(exc.body, status=400)
        pid = body.get("prompt_id") or secrets.token_hex(16)
        number, self.number = self.number, self.number + 1
        item = {"number": number, "prompt_id": pid, "graph": body["prompt"], "outputs": outputs, "step": step,
                "extra": {"client_id": body.get("client_id"), "create_time": _ms()}}
        self.pending.append(item)
        self._wake.set()
        await self._status()
        return web.json_response({"prompt_id": pid, "number": number, "node_errors": node_errors})

    async def prompt_info(self, request: web.Request) -> web.Response:
        return web.json_response(self._exec_info())

    # -- the worker -----------------------------------------------------------------------------
    async def _work_queue(self) -> None:
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            self.running = self.pending.pop(0)
            try:
                await self._run(self.running)
            finally:
                self.running = None
                await self._status()

    async def _run(self, item: dict[str, Any]) -> None:
        pid, graph, cid, step = item["prompt_id"], item["graph"], item["extra"]["client_id"], item["step"]
        messages: list[Any] = []

        async def event(kind: str, data: dict[str, Any], keep: bool = False) -> None:
            data = {**data, "prompt_id": pid}
            if keep:
                messages.append([kind, data])
            await self._send(cid, kind, data)

        nodes = order(graph, item["outputs"])
        sigs = {nid: signature(graph, nid) for nid in nodes}
        cached = [nid for nid in nodes if sigs[nid] in self._cache]
        await event("execution_start", {"timestamp": _ms()}, keep=True)
        await event("execution_cached", {"nodes": cached, "timestamp": _ms()}, keep=True)
        values: dict[str, tuple[Any, ...]] = {nid: self._cache[sigs[nid]][0] for nid in cached}
        outputs: dict[str, Any] = {nid: self._cache[sigs[nid]][1] for nid in cached if self._cache[sigs[nid]][1]}
        state: dict[str, Any] = {}
        executed = list(cached)
        for nid in nodes:
            if nid in values:
                continue
            cls = graph[nid]["class_type"]
            state[nid] = {"value": 0.0, "max": 1.0, "state": "running", "node_id": nid, "prompt_id": pid,
                          "display_node_id": nid, "parent_node_id": None, "real_node_id": nid}
            await event("progress_state", {"nodes": state})
            await event("executing", {"node": nid, "display_node": nid})
            try:
                if cls == "CheckpointLoaderSimple":
                    await asyncio.sleep(self.load_s)   # a model load: not generation time
                if cls.startswith("KSampler"):
                    await self._sample(graph[nid]["inputs"], nid, step, event)
                inputs = {k: values[str(v[0])][v[1]] if isinstance(v, list) and len(v) == 2 else v
                          for k, v in graph[nid]["inputs"].items()}
                values[nid] = run_node(cls, inputs, self.inputs)
            except _Interrupted:
                await event("execution_interrupted", {"node_id": nid, "node_type": cls, "executed": executed,
                                                      "timestamp": _ms()}, keep=True)
                self._record(item, {}, "error", messages)
                return
            except NodeFailed as exc:
                await event("execution_error", {
                    "node_id": nid, "node_type": cls, "executed": executed, "exception_message": str(exc),
                    "exception_type": exc.exception_type, "traceback": ["[traceback lines removed]"],
                    "current_inputs": {}, "current_outputs": [], "timestamp": _ms()}, keep=True)
                # as the real server: the history is written after the event (its prompt_worker, not execute)
                asyncio.get_running_loop().call_later(0.1, self._record, item, outputs, "error", messages)
                return
            ui = self._save(graph[nid], values[nid], inputs, step) if NODES[cls].output_node else None
            self._cache[sigs[nid]] = (values[nid], ui)
            if ui:
                outputs[nid] = ui
                await event("executed", {"node": nid, "display_node": nid, "output": ui})
            state[nid] = {**state[nid], "value": 1.0, "state": "finished"}
            await event("progress_state", {"nodes": state})
            executed.append(nid)
        await event("execution_success", {"timestamp": _ms()}, keep=True)
        self._record(item, outputs, "success", messages)
        await self._status()
        await event("executing", {"node": None})

    async def _sample(self, inputs: dict[str, Any], nid: str, step: str, event: Any) -> None:
        steps, parts = int(inputs.get("steps", 20)), set(step.split("+"))
        for i in range(1, steps + 1):
            if self.running and self.running["prompt_id"] in self._stop:
                raise _Interrupted
            if i == 1 and (oom := parts & set(OOM)):
                raise NodeFailed(*OOM[oom.pop()])
            await event("progress", {"value": i, "max": steps, "node": nid})
            await asyncio.sleep(self.timeout_s / steps if "timeout" in parts else self.step_s)

    def _save(self, node: dict[str, Any], value: tuple[Any, ...], inputs: dict[str, Any], step: str
              ) -> dict[str, Any]:
        temp = node["class_type"] == "PreviewImage"
        prefix = "ComfyUI_temp_" + secrets.token_hex(3) if temp else str(inputs.get("filename_prefix", "ComfyUI"))
        subfolder, _, prefix = prefix.rpartition("/")
        kind = "temp" if temp else "output"
        images = []
        for image in ([] if "empty" in step.split("+") and not temp else inputs["images"]):
            counter = self._counters.get((subfolder, prefix), 0) + 1
            self._counters[(subfolder, prefix)] = counter
            name = f"{prefix}_{counter:05d}_.png"
            info = PngImagePlugin.PngInfo()
            info.add_text("prompt", json.dumps(self.running["graph"] if self.running else {}))
            buf = io.BytesIO()
            image.save(buf, format="PNG", pnginfo=info)
            self.files[f"{kind}/{subfolder}/{name}"] = b"not a png" if "broken" in step.split("+") else buf.getvalue()
            images.append({"filename": name, "subfolder": subfolder, "type": kind})
        return {"images": images}

    def _record(self, item: dict[str, Any], outputs: dict[str, Any], status: str, messages: list[Any]) -> None:
        self.history[item["prompt_id"]] = {
            "prompt": [item["number"], item["prompt_id"], item["graph"], item["extra"], item["outputs"]],
            "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages},
            "meta": {nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                     for nid in outputs}}

    # -- the other routes -----------------------------------------------------------------------
    async def all_history(self, request: web.Request) -> web.Response:
        items = list(self.history.items())[-int(request.query.get("max_items", 10_000)):]
        return web.json_response(dict(items))

    async def get_history(self, request: web.Request) -> web.Response:
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def view(self, request: web.Request) -> web.Response:
        name, subfolder = request.query.get("filename", ""), request.query.get("subfolder", "")
        kind = request.query.get("type", "output")
        if "view_down" in self.script[min(self.generations, len(self.script)) - 1].split("+"):
            return web.Response(status=503, text="busy")
        if not name or ".." in name or name.startswith("/"):
            return web.Response(status=400)
        if ".." in subfolder.split("/") or subfolder.startswith("/"):
            return web.Response(status=403)
        data = self.inputs.get(name) if kind == "input" else self.files.get(f"{kind}/{subfolder}/{name}")
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png",
                            headers={"Content-Disposition": f'filename="{name}"'})

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        asked = body.get("prompt_id")
        self.interrupted.append(asked or "*")
        if self.running and asked in (None, self.running["prompt_id"]):   # else: "not currently running"
            self._stop.add(self.running["prompt_id"])
        return web.Response()

    async def queue_post(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.deleted += body.get("delete", [])
        gone = set(body.get("delete", []))
        self.pending = [] if body.get("clear") else [i for i in self.pending if i["prompt_id"] not in gone]
        await self._status()
        return web.Response()

    async def queue_get(self, request: web.Request) -> web.Response:
        def row(i: dict[str, Any]) -> list[Any]:
            return [i["number"], i["prompt_id"], i["graph"], i["extra"], i["outputs"]]

        return web.json_response({"queue_running": [row(self.running)] if self.running else [],
                                  "queue_pending": [row(i) for i in self.pending]})

    async def system_stats(self, request: web.Request) -> web.Response:
        vram = 0 if self.device == "cpu" else 24 * 2**30
        return web.json_response({
            "system": {"os": "posix", "comfyui_version": "0.8.0", "python_version": "3.11", "embedded_python": False},
            "devices": [{"name": self.device if self.device == "cpu" else "cuda:0 NVIDIA (fake)", "type": self.device,
                         "index": None if self.device == "cpu" else 0, "vram_total": vram, "vram_free": vram}]})

    async def object_info(self, request: web.Request) -> web.Response:
        return web.json_response({cls: {"input": {"required": {k: v.config() for k, v in spec.inputs.items()}},
                                        "output": list(spec.outputs), "output_node": spec.output_node, "name": cls}
                                  for cls, spec in NODES.items()})

    async def upload(self, request: web.Request) -> web.Response:
        """POST /upload/image: multipart `image` (a file with a filename), `type`, `subfolder`, `overwrite`;
        answers {name, subfolder, type}. A name already taken is renamed `stem (1).ext` unless the file
        there has the same bytes (then its name is reused), as the real server does."""
        form = await request.post()
        image = form.get("image")
        if image is None or not getattr(image, "filename", None):
            return web.Response(status=400)
        data = image.file.read()
        name = str(image.filename)
        overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
        if name in self.inputs and not overwrite and self.inputs[name] != data:
            stem, _, ext = name.rpartition(".")
            i = 1
            while f"{stem} ({i}).{ext}" in self.inputs:
                i += 1
            name = f"{stem} ({i}).{ext}"
        self.inputs[name] = data
        self.requests.append({"path": request.path, "upload": name, "bytes": len(data)})
        return web.json_response({"name": name, "subfolder": str(form.get("subfolder", "")),
                                  "type": str(form.get("type", "input"))})


@web.middleware
async def _same_origin(request: web.Request, handler: Any) -> web.StreamResponse:
    """As the real server on loopback: a browser request whose Origin is not the Host it was sent to is 403."""
    origin = request.headers.get("Origin")
    if origin and origin.split("://", 1)[-1].rstrip("/") != request.headers.get("Host", ""):
        return web.Response(status=403)
    return await handler(request)


class _Interrupted(Exception):
    """The running prompt was interrupted (checked per sampler step)."""


def _example_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (512, 512), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["WORKFLOW", "WORKFLOW_CONTROL", "WORKFLOW_IMG2IMG", "WORKFLOW_INPAINT", "FakeComfyUI"]
