"""Fake Luma Dream Machine API: POST /dream-machine/v1/generations/image answers 201 with a generation in
state `queued`; GET /dream-machine/v1/generations/{id} moves it through `dreaming` to `completed`
(`assets.image`) or `failed` (`failure_reason`); the answer's `model` is `photon-v1.0` whatever was asked,
as Luma's doc example shows. Errors are `{"detail": ...}`. Moderation happens after submission: the
`refuse` step fails the generation with "Advanced prompt moderation failed"."""

from __future__ import annotations

import json
from typing import Any

from .base import Reply
from .images_api import FakeImagesApi

SIZES = {"1:1": (1536, 1536), "4:3": (1792, 1344), "3:4": (1344, 1792), "16:9": (2048, 1152),
         "9:16": (1152, 2048), "21:9": (2432, 1024), "9:21": (1024, 2432)}


class FakeLuma(FakeImagesApi):
    name = "luma"
    prefix = "/dream-machine/v1"
    paths = ("/dream-machine/v1/generations/image",)

    def error_body(self, message: str) -> Any:
        return {"detail": message}

    def bad_key(self) -> Reply:
        return Reply(401, {"detail": "Invalid API key"})

    def answer(self, req: dict[str, Any], step: str) -> Reply:
        body = json.loads(req["body"])
        prompt = str(body.get("prompt", ""))
        if len(prompt) < 3:
            return Reply(400, {"detail": "Prompt is too short, minimum length is 3 characters"})
        ratio = body.get("aspect_ratio", "16:9")
        if ratio not in SIZES:
            return Reply(400, {"detail": [{"type": "literal_error", "loc": ["body", "aspect_ratio"],
                                           "msg": f"Input should be one of {', '.join(SIZES)}", "input": ratio}]})
        gen = f"5a1c0000-0000-4000-8000-{self.generations:012d}"
        self.state[gen] = {"step": step, "polls": 0, "body": body}
        return Reply(201, self.generation(gen, "queued"))

    def generation(self, gen: str, state: str, **extra: Any) -> dict[str, Any]:
        task = self.state[gen]
        return {"id": gen, "generation_type": "image", "state": state, "failure_reason": None,
                "created_at": "2026-12-02T06:00:00.000000Z", "model": "photon-v1.0",
                "assets": {"image": None, "video": None, "progress_video": None},
                "request": task["body"]} | extra

    def other(self, req: dict[str, Any]) -> Reply:
        if req["method"] == "GET" and req["path"].startswith("/dream-machine/v1/generations/"):
            gen = req["path"].rsplit("/", 1)[1]
            task = self.state.get(gen)
            if task is None:
                return Reply(404, {"detail": "Generation not found"})
            task["polls"] += 1
            if task["polls"] < 3:
                return Reply(200, self.generation(gen, "queued" if task["polls"] == 1 else "dreaming"))
            if task["step"] == "refuse":
                return Reply(200, self.generation(gen, "failed", failure_reason="Advanced prompt moderation failed"))
            if "image" not in task:
                w, h = SIZES[task["body"].get("aspect_ratio", "16:9")]
                items = self.items(task["step"], 1, w, h, None, as_url=True)
                task["image"] = items[0]["url"] if items else None
            return Reply(200, self.generation(gen, "completed", assets={"image": task["image"], "video": None,
                                                                         "progress_video": None}))
        return super().other(req)
