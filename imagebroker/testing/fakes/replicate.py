"""Fake Replicate: POST /v1/models/{owner}/{name}/predictions or /v1/predictions (201), GET
/v1/predictions/{id} (starting -> processing -> succeeded), POST .../cancel, outputs under /files/.
The hostile-URL steps of `bfl.HostileURLs` (`foreign_poll` moves `urls.get` and `urls.cancel`)."""

from __future__ import annotations

import json
from typing import Any

from .base import Reply, seen_image
from .hostile import HostileURLs

SINGLE_OUTPUT = ("flux-canny-pro", "flux-depth-pro")   # BFL's [pro] models answer one URL, not a list
SIZES = {"1:1": (1024, 1024), "16:9": (1344, 768), "9:16": (768, 1344), "4:3": (1152, 896),
         "3:4": (896, 1152), "3:2": (1216, 832), "2:3": (832, 1216)}


class FakeReplicate(HostileURLs):
    name = "replicate"

    def error_body(self, message: str) -> Any:
        return {"title": message, "detail": message, "status": 500}

    def bad_key(self) -> Reply:
        return Reply(401, {"title": "Unauthenticated", "detail": "You did not pass a valid authentication "
                                                                  "token", "status": 401})

    def is_generation(self, req: dict[str, Any]) -> bool:
        return req["method"] == "POST" and req["path"].endswith("/predictions")

    def _prediction(self, pid: str) -> dict[str, Any]:
        task = self.state[pid]
        base = {"id": pid, "model": task["model"], "version": "v", "input": task["input"], "logs": "",
                "error": None, "status": task["status"], "created_at": "2026-11-22T00:00:00Z",
                "urls": {"get": self.poll_url(task["step"], f"{self.url}/v1/predictions/{pid}"),
                         "cancel": self.poll_url(task["step"], f"{self.url}/v1/predictions/{pid}/cancel")},
                "output": None, "metrics": {}}
        if task["status"] == "succeeded":
            base["output"] = [self.result_url(task["step"], f"{self.url}/files/{pid}-{i}.png")
                              for i in range(task["n"])]
            if any(f"/{m}/" in task["model"] for m in SINGLE_OUTPUT) and base["output"]:
                base["output"] = base["output"][0]
            base["metrics"] = {"predict_time": 2.5, "total_time": 3.0}
        if task["status"] == "failed":
            base["error"] = "NSFW content detected. Try running it again, or try a different prompt."
        return base

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        body = json.loads(req["body"])
        pid = f"pred{self.generations:04d}"
        inp = body["input"]
        if (bad := self.edit_inputs(inp)) is not None:
            return bad
        n = 0 if step == "empty" else inp.get("num_outputs", 1)
        self.state[pid] = {"model": req["path"], "input": inp, "status": "starting", "step": step, "n": n,
                           "polls": 0}
        return Reply(201, self._prediction(pid))

    def other(self, req: dict[str, Any]) -> Reply:
        path = req["path"]
        if path.startswith("/v1/predictions/"):
            pid = path.split("/")[3]
            task = self.state.get(pid)
            if task is None:
                return Reply(404, {"title": "Not found", "detail": "prediction not found", "status": 404})
            if path.endswith("/cancel"):
                task["status"] = "canceled"
                return Reply(200, self._prediction(pid))
            if task["status"] not in ("canceled",):
                task["polls"] += 1
                task["status"] = "processing" if task["polls"] < 2 else (
                    "failed" if task["step"] == "refuse" else "succeeded")
            return Reply(200, self._prediction(pid))
        if path.startswith("/files/"):
            pid, i = path.rsplit("/", 1)[1].removesuffix(".png").rsplit("-", 1)
            task = self.state[pid]
            inp = task["input"]
            w, h = inp.get("_size") or ((inp["width"], inp["height"]) if "width" in inp else SIZES[inp["aspect_ratio"]])
            seed = inp.get("seed")
            return Reply(200, self.images(task["step"], 1, w, h, None if seed is None else seed + int(i))[0],
                         content_type="image/png")
        return super().other(req)

    def edit_inputs(self, inp: dict[str, Any]) -> Reply | None:
        """File inputs as Replicate takes them (here data: URIs): `image` or `input_image`, and `mask` of
        the same size; an output sized by its input (Kontext's `match_input_image`, Fill) notes it in
        `_size`. A file input that is not an image is a 422 naming it."""
        seen = {}
        for name in ("image", "input_image", "mask", "control_image"):
            if name in inp:
                if (got := seen_image(str(inp[name]))) is None:
                    return Reply(422, {"title": "Input validation failed", "status": 422,
                                       "detail": f"- input.{name}: Does not match format 'uri'"})
                seen[name] = got
        if not seen:
            return None
        first = seen.get("image") or seen.get("input_image") or seen["control_image"]
        if "mask" in seen and (seen["mask"].width, seen["mask"].height) != (first.width, first.height):
            return Reply(422, {"title": "Input validation failed", "status": 422,
                               "detail": "mask and image must have the same dimensions"})
        self.state.setdefault("edits", []).append({"input": dict(inp), "inputs": seen})
        if "width" not in inp and inp.get("aspect_ratio") in (None, "match_input_image") and \
                inp.get("megapixels", "match_input") == "match_input":
            inp["_size"] = (first.width, first.height)
        return None
