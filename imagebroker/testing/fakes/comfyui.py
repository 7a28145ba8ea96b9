"""Fake ComfyUI (aiohttp): POST /prompt validates and queues; a worker emits the websocket events
(execution_start, executing, progress, executed, execution_success, executing null) to the client's
socket, writes a real PNG with a `prompt` text chunk, and records history with ms timestamps.
GET /history/{id}, GET /view, POST /interrupt, POST /queue, GET /queue, and all under /api too.

Extra steps: `nodeerror` (400 with node_errors), `oom` (execution_error: torch.OutOfMemoryError),
`nows` (no websocket: the client must poll)."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import time
from typing import Any, ClassVar

from aiohttp import WSMsgType, web
from PIL import Image, PngImagePlugin

KNOWN = {"CheckpointLoaderSimple", "CLIPTextEncode", "KSampler", "KSamplerAdvanced", "EmptyLatentImage",
         "VAEDecode", "SaveImage", "LoadImage", "LoadImageMask", "VAEEncode", "SetLatentNoiseMask"}

WORKFLOW = {  # a minimal SD text-to-image graph in API format
    "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                              "scheduler": "normal", "denoise": 1, "model": ["4", 0],
                                              "positive": ["6", 0], "negative": ["7", 0],
                                              "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "positive", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "negative", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


# img2img: the uploaded image encoded as the latent, denoised by `denoise`; inpainting adds a mask
# (LoadImageMask, channel red: white = change) on the latent
WORKFLOW_IMG2IMG = {k: v for k, v in WORKFLOW.items() if k != "5"} | {
    "3": {"class_type": "KSampler", "inputs": {**WORKFLOW["3"]["inputs"], "denoise": 0.75, "latent_image": ["11", 0]}},
    "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
}
WORKFLOW_INPAINT = WORKFLOW_IMG2IMG | {
    "3": {"class_type": "KSampler", "inputs": {**WORKFLOW_IMG2IMG["3"]["inputs"], "denoise": 1.0,
                                              "latent_image": ["13", 0]}},
    "12": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
    "13": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["12", 0]}},
}


class FakeComfyUI:
    name = "comfyui"
    key = ""
    prefix = ""
    unsupported: ClassVar[set[str]] = {"refuse", "badkey"}  # ComfyUI has no moderation and no authentication

    def __init__(self, script: list[str] | None = None, port: int = 0) -> None:
        self.script = list(script or ["ok"])
        self.requests: list[dict[str, Any]] = []
        self.generations = 0
        self.timeout_s = 30.0
        self.history: dict[str, Any] = {}
        self.files: dict[str, bytes] = {}
        self.inputs: dict[str, bytes] = {}   # uploaded with /upload/image, by name
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.interrupted: set[str] = set()
        self.deleted: list[str] = []
        self._port = port
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------
    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        for prefix in ("", "/api"):
            app.router.add_post(f"{prefix}/prompt", self.prompt)
            app.router.add_get(f"{prefix}/history/{{pid}}", self.get_history)
            app.router.add_get(f"{prefix}/view", self.view)
            app.router.add_post(f"{prefix}/interrupt", self.interrupt)
            app.router.add_post(f"{prefix}/queue", self.queue_post)
            app.router.add_get(f"{prefix}/queue", self.queue_get)
            app.router.add_get(f"{prefix}/ws", self.ws)
            app.router.add_post(f"{prefix}/upload/image", self.upload)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        self.base_url = self.url
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> FakeComfyUI:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- routes -----------------------------------------------------------------------------
    async def ws(self, request: web.Request) -> web.StreamResponse:
        if self._step_now() == "nows":
            return web.Response(status=404)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        cid = request.query.get("clientId", "anon")
        self.sockets[cid] = sock
        await sock.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                         "sid": cid}})
        async for msg in sock:
            if msg.type == WSMsgType.CLOSE:
                break
        return sock

    def _step_now(self) -> str:
        return self.script[min(self.generations + 1, len(self.script)) - 1]

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
        graph, pid, cid = body["prompt"], body.get("prompt_id"), body.get("client_id")
        unknown = next((k for k, n in graph.items() if n.get("class_type") not in KNOWN), None)
        if unknown:
            return web.json_response({"error": {"type": "invalid_prompt", "message": "invalid prompt",
                                                "details": f"Node ID '#{unknown}'"}, "node_errors": {}}, status=400)
        missing = next(((k, n) for k, n in graph.items() if n["class_type"] in ("LoadImage", "LoadImageMask")
                        and n["inputs"].get("image") not in self.inputs), None)
        if missing:  # LoadImage's VALIDATE_INPUTS: the file must be in the input folder
            node, n = missing
            error = {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                     "details": f"image - Invalid image file: {n['inputs'].get('image')}", "extra_info": {}}
            return web.json_response({
                "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                          "details": "", "extra_info": {}},
                "node_errors": {node: {"errors": [error], "dependent_outputs": ["9"], "class_type": n["class_type"]}}},
                status=400)
        if step == "nodeerror":  # the real shape (ComfyUI v0.3.64 execution.validate_prompt)
            details = "ckpt_name: 'x.safetensors' not in (list of length 37)"
            error = {"type": "value_not_in_list", "message": "Value not in list", "details": details,
                     "extra_info": {"input_name": "ckpt_name", "input_config": None,
                                    "received_value": "x.safetensors"}}
            return web.json_response({
                "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                          "details": f"Value not in list: {details}", "extra_info": {}},
                "node_errors": {"4": {"errors": [error], "dependent_outputs": ["9"],
                                      "class_type": "CheckpointLoaderSimple"}}}, status=400)
        asyncio.get_running_loop().create_task(self._work(graph, pid, cid, step))
        return web.json_response({"prompt_id": pid, "number": self.generations, "node_errors": {}})

    async def _send(self, cid: str | None, kind: str, data: dict[str, Any]) -> None:
        sock = self.sockets.get(cid or "")
        if sock is not None and not sock.closed:
            await sock.send_json({"type": kind, "data": data})

    async def _work(self, graph: dict[str, Any], pid: str, cid: str | None, step: str) -> None:
        start = int(time.time() * 1000)
        messages: list[Any] = [["execution_start", {"prompt_id": pid, "timestamp": start}]]
        await self._send(cid, "execution_start", messages[0][1])
        await self._send("other-client", "executing", {"node": "3", "prompt_id": "someone-else"})
        sampler = next(n for n in graph.values() if n["class_type"].startswith("KSampler"))
        latent = self._latent(graph)
        steps = int(sampler["inputs"].get("steps", 20))
        for i in range(1, steps + 1):
            if pid in self.interrupted:
                messages.append(["execution_interrupted", {"prompt_id": pid, "timestamp": int(time.time() * 1000)}])
                self.history[pid] = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                                              "messages": messages}}
                await self._send(cid, "execution_interrupted", {"prompt_id": pid, "node_id": "3"})
                return
            await self._send(cid, "progress", {"value": i, "max": steps, "prompt_id": pid, "node": "3"})
            sock = self.sockets.get(cid or "")
            if sock is not None and not sock.closed:
                await sock.send_bytes(struct.pack(">II", 1, 2) + b"preview")
            await asyncio.sleep(self.timeout_s / steps if step == "timeout" else 0.005)
        if step == "oom":
            err = {"prompt_id": pid, "node_id": "3", "node_type": "KSampler",
                   "exception_type": "torch.OutOfMemoryError", "exception_message": "CUDA out of memory"}
            messages.append(["execution_error", err])
            self.history[pid] = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                                          "messages": messages}}
            await self._send(cid, "execution_error", err)
            return
        images = []
        for i in range(0 if step == "empty" else int(latent.get("batch_size", 1))):
            name = f"ComfyUI_{len(self.files):05d}_.png"
            img = Image.new("RGB", (latent["width"], latent["height"]), (10 * i, 80, 160))
            info = PngImagePlugin.PngInfo()
            info.add_text("prompt", json.dumps(graph))
            buf = io.BytesIO()
            img.save(buf, format="PNG", pnginfo=info)
            self.files[name] = b"not a png" if step == "broken" else buf.getvalue()
            images.append({"filename": name, "subfolder": "", "type": "output"})
        await self._send(cid, "executed", {"node": "9", "output": {"images": images}, "prompt_id": pid})
        messages.append(["execution_success", {"prompt_id": pid, "timestamp": int(time.time() * 1000)}])
        self.history[pid] = {"prompt": [self.generations, pid, graph, {"client_id": cid}, ["9"]],
                             "outputs": {"9": {"images": images}},
                             "status": {"status_str": "success", "completed": True, "messages": messages}}
        await self._send(cid, "execution_success", {"prompt_id": pid})
        await self._send(cid, "executing", {"node": None, "prompt_id": pid})

    def _latent(self, graph: dict[str, Any]) -> dict[str, Any]:
        """The size and batch the graph makes: its EmptyLatentImage's, or the uploaded image's it encodes."""
        empty = next((n for n in graph.values() if n["class_type"] == "EmptyLatentImage"), None)
        if empty is not None:
            return empty["inputs"]
        load = next(n for n in graph.values() if n["class_type"] == "LoadImage")
        w, h = Image.open(io.BytesIO(self.inputs[load["inputs"]["image"]])).size
        return {"width": w, "height": h, "batch_size": 1}

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

    async def get_history(self, request: web.Request) -> web.Response:
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def view(self, request: web.Request) -> web.Response:
        name = request.query.get("filename", "")
        if not name or ".." in name or name.startswith("/"):
            return web.Response(status=400)
        if name not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[name], content_type="image/png")

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        self.interrupted.add(body.get("prompt_id", "*"))
        return web.Response()

    async def queue_post(self, request: web.Request) -> web.Response:
        self.deleted += (await request.json()).get("delete", [])
        return web.Response()

    async def queue_get(self, request: web.Request) -> web.Response:
        return web.json_response({"queue_running": [], "queue_pending": []})
