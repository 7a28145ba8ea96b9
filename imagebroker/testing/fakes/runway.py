"""Fake Runway API: POST /v1/text_to_image -> {id}; GET /v1/tasks/{id} -> PENDING, RUNNING (with
`progress`), SUCCEEDED (`output`: [url]) or FAILED (`failure`, `failureCode`); DELETE /v1/tasks/{id}
cancels (204, no body). Every request needs `X-Runway-Version: 2024-11-06` (else a 400), `ratio` must be
one of the 16 values the SDK lists, gen4_image_turbo needs 1 to 3 `referenceImages`, and errors are
`{"error": ...}`. The `refuse` step fails the task with `SAFETY.INPUT.TEXT`, as Runway moderates."""

from __future__ import annotations

import json
from typing import Any

from .base import Reply, seen_image
from .images_api import FakeImagesApi

RATIOS = {"1024:1024", "1080:1080", "1168:880", "1360:768", "1440:1080", "1080:1440", "1808:768", "1920:1080",
          "1080:1920", "2112:912", "1280:720", "720:1280", "720:720", "960:720", "720:960", "1680:720"}


class FakeRunway(FakeImagesApi):
    name = "runway"
    paths = ("/v1/text_to_image",)

    def error_body(self, message: str) -> Any:
        return {"error": message}

    def bad_key(self) -> Reply:
        return Reply(401, {"error": "Invalid API key"})

    def dispatch(self, req: dict[str, Any]) -> Reply:
        if not req["path"].startswith("/files/") and req["headers"].get("x-runway-version") != "2024-11-06":
            return Reply(400, {"error": "X-Runway-Version header is required (2024-11-06)"})
        return super().dispatch(req)

    def answer(self, req: dict[str, Any], step: str) -> Reply:
        body = json.loads(req["body"])
        if body.get("ratio") not in RATIOS:
            return Reply(400, {"error": f"Invalid ratio {body.get('ratio')!r}"})
        refs = body.get("referenceImages") or []
        if body.get("model") == "gen4_image_turbo" and not 1 <= len(refs) <= 3:
            return Reply(400, {"error": "referenceImages: gen4_image_turbo requires 1 to 3 reference images"})
        seen = [seen_image(str(r.get("uri", ""))) for r in refs]
        if None in seen or len(refs) > 3:
            return Reply(400, {"error": "referenceImages: each uri must be an image"})
        if refs:
            self.state.setdefault("edits", []).append({"body": body, "inputs": seen})
        task = f"0f9e{self.generations:04d}-task"
        self.state[task] = {"step": step, "polls": 0, "body": body}
        return Reply(200, {"id": task})

    def other(self, req: dict[str, Any]) -> Reply:
        if req["path"].startswith("/v1/tasks/"):
            task_id = req["path"].rsplit("/", 1)[1]
            task = self.state.get(task_id)
            if task is None:
                return Reply(404, {"error": "Task not found"})
            if req["method"] == "DELETE":
                task["cancelled"] = True
                return Reply(204, b"", content_type="text/plain")
            task["polls"] += 1
            base = {"id": task_id, "createdAt": "2026-12-02T06:00:00.000Z"}
            if task.get("cancelled"):
                return Reply(200, base | {"status": "CANCELLED"})
            if task["polls"] < 3:
                return Reply(200, base | ({"status": "PENDING"} if task["polls"] == 1
                                          else {"status": "RUNNING", "progress": 0.5}))
            if task["step"] == "refuse":
                return Reply(200, base | {"status": "FAILED", "failure": "The prompt was flagged by moderation.",
                                          "failureCode": "SAFETY.INPUT.TEXT"})
            w, h = (int(v) for v in task["body"]["ratio"].split(":"))
            if "output" not in task:
                task["output"] = [i["url"] for i in self.items(task["step"], 1, w, h, task["body"].get("seed"),
                                                                as_url=True)]
            return Reply(200, base | {"status": "SUCCEEDED", "output": task["output"]})
        return super().other(req)
