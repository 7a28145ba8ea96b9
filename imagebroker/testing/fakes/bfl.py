"""Fake Black Forest Labs: POST /v1/{model} -> {id, polling_url}; GET /v1/get_result?id= -> Pending,
then Ready with result.sample; GET /delivery/{id} serves the image. The hostile-URL steps are
`hostile.HostileURLs`'s. Steps for an accepted job whose answer is hard to get: `poll_flaky` (the
first two polls answer 503), `poll_down` (every poll answers 503), `download_flaky` (the first
download answers 503)."""

from __future__ import annotations

import json
from typing import Any

from .base import Reply, seen_image
from .hostile import HostileURLs

REFERENCES = ["input_image", *(f"input_image_{i}" for i in range(2, 9))]


class FakeBFL(HostileURLs):
    name = "bfl"

    def authorised(self, req: dict[str, Any]) -> bool:
        return req["headers"].get("x-key") == self.key

    def error_body(self, message: str) -> Any:
        return {"error": message.replace(" ", "_"), "message": message, "retry_after": 1}

    def bad_key(self) -> Reply:
        return Reply(401, {"detail": "Unauthorized: invalid x-key"})

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        body = json.loads(req["body"])
        if (bad := self.edit_inputs(req["path"], body)) is not None:
            return bad
        task = f"task-{self.generations}"
        self.state[task] = {"step": step, "polls": 0, "body": body}
        polling_url = self.poll_url(step, f"{self.url}/v1/get_result?id={task}")
        return Reply(200, {"id": task, "polling_url": polling_url})

    def other(self, req: dict[str, Any]) -> Reply:
        if req["path"] == "/v1/get_result":
            task = self.state.get(req["query"].get("id", [""])[0])
            if task is None:
                return Reply(200, {"status": "Task not found"})
            task["polls"] += 1
            if task["step"] == "poll_down" or (task["step"] == "poll_flaky" and task["polls"] <= 2):
                return Reply(503, self.error_body("service unavailable"))
            if task["polls"] < 2 or (task["step"] == "poll_flaky" and task["polls"] < 4):
                return Reply(200, {"id": "x", "status": "Pending"})
            if task["step"] == "refuse":
                return Reply(200, {"id": "x", "status": "Content Moderated"})
            if task["step"] == "empty":
                return Reply(200, {"id": "x", "status": "Ready", "result": {}})
            tid = req["query"]["id"][0]
            sample = self.result_url(task["step"], f"{self.url}/delivery/{tid}")
            return Reply(200, {"id": tid, "status": "Ready", "result": {
                "sample": sample, "seed": task["body"].get("seed", 42)}})
        if req["path"].startswith("/delivery/"):
            task = self.state[req["path"].rsplit("/", 1)[1]]
            task["downloads"] = task.get("downloads", 0) + 1
            if task["step"] == "download_flaky" and task["downloads"] == 1:
                return Reply(503, b"busy", content_type="text/plain")
            b = task["body"]
            w, h = b.get("_size") or (b["width"], b["height"])
            img = self.images(task["step"], 1, w, h, b.get("seed"), "jpeg")[0]
            return Reply(200, img, content_type="image/jpeg")
        return super().other(req)

    def edit_inputs(self, path: str, body: dict[str, Any]) -> Reply | None:
        """Reads an edit's base64 images as BFL does: Fill's `image` + `mask` (the same size), the others'
        `input_image`, `input_image_2`..`_8`; a size the output takes from the input is noted in `_size`.
        A 422 names a field that is not an image, as FastAPI-style validation does."""
        fill = path.endswith("-fill")
        if path.endswith(("-canny", "-depth")):   # FLUX.1 Tools: a control image, no size fields
            if "width" in body or "height" in body:
                return Reply(422, {"detail": [{"loc": ["body", "width"], "msg": "extra fields not permitted",
                                               "type": "value_error.extra"}]})
            names = ["preprocessed_image" if "preprocessed_image" in body else "control_image"]
        else:
            names = ["image", "mask"] if fill else [k for k in REFERENCES if k in body]
        seen = {}
        for name in names:
            if (got := seen_image(str(body.get(name, "")))) is None:
                return Reply(422, {"detail": [{"loc": ["body", name], "msg": "invalid image",
                                               "type": "value_error"}]})
            seen[name] = got
        if fill and (seen["mask"].width, seen["mask"].height) != (seen["image"].width, seen["image"].height):
            return Reply(422, {"detail": [{"loc": ["body", "mask"], "msg": "mask size must match the image",
                                           "type": "value_error"}]})
        if seen:
            self.state.setdefault("edits", []).append({"path": path, "inputs": seen, "body": dict(body)})
            first = seen.get("image") or seen.get("input_image") or next(iter(seen.values()))
            if "width" not in body:   # Kontext and Fill: the input's size
                body["_size"] = (first.width, first.height)
        return None
