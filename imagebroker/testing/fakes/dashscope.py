"""Fake DashScope (Model Studio): Wan as an async task (POST /api/v1/services/aigc/text2image/image-synthesis,
which needs `X-DashScope-Async: enable`, then GET /api/v1/tasks/{id}: PENDING, RUNNING, SUCCEEDED) and
Qwen-Image synchronously (POST /api/v1/services/aigc/multimodal-generation/generation). Sizes are `W*H`;
Wan's `n` defaults to 4. As the docs and probes describe: error bodies are flat `{code, message,
request_id}`, a bad key is 401 `InvalidApiKey`, moderation is `DataInspectionFailed` (a 400 on submit; the
`refuse` step fails the task with it, as output moderation does), an unknown task is a 200 with status
UNKNOWN, and `partial` succeeds with one of two results failed (usage counts only the image made)."""

from __future__ import annotations

import json
from typing import Any

from .base import Reply
from .images_api import FakeImagesApi

REQUEST_ID = "7d1f1e2a-0000-4000-8000-000000000001"


class FakeDashScope(FakeImagesApi):
    name = "dashscope"
    prefix = "/api/v1"
    paths = ("/api/v1/services/aigc/text2image/image-synthesis",
             "/api/v1/services/aigc/multimodal-generation/generation")

    def error_body(self, message: str) -> Any:
        return {"code": "InternalError", "message": message, "request_id": REQUEST_ID}

    def bad_key(self) -> Reply:
        return Reply(401, {"code": "InvalidApiKey", "message": "Invalid API-key provided.", "request_id": REQUEST_ID})

    def rate_limited(self) -> Reply:
        return Reply(429, {"code": "Throttling.RateQuota", "message": "Requests rate limit exceeded, please try "
                           "again later.", "request_id": REQUEST_ID}, {"Retry-After": "1"})

    def answer(self, req: dict[str, Any], step: str) -> Reply:
        body = json.loads(req["body"])
        params = body.get("parameters") or {}
        w, h = (int(v) for v in str(params.get("size", "1024*1024")).split("*"))
        if req["path"].endswith("/generation"):   # Qwen-Image, sync
            text = body["input"]["messages"][0]["content"][0]["text"]
            if step == "refuse":
                return Reply(400, {"code": "DataInspectionFailed", "message": "Input or output data may contain "
                                   "inappropriate content.", "request_id": REQUEST_ID})
            items = self.items(step, 1, w, h, params.get("seed"), as_url=True)
            return Reply(200, {"output": {"choices": [{"finish_reason": "stop", "message": {
                "role": "assistant", "content": [{"image": i["url"]} for i in items]}}]},
                "usage": {"width": w, "height": h, "image_count": len(items)}, "request_id": REQUEST_ID,
                "_prompt": text})
        if req["headers"].get("x-dashscope-async") != "enable":
            return Reply(403, {"code": "AccessDenied", "message": "current user api does not support synchronous "
                               "calls", "request_id": REQUEST_ID})
        task = f"task-{self.generations}"
        self.state[task] = {"step": step, "polls": 0, "n": int(params.get("n", 4)), "size": (w, h),
                            "seed": params.get("seed"), "body": body}
        return Reply(200, {"output": {"task_status": "PENDING", "task_id": task}, "request_id": REQUEST_ID})

    def other(self, req: dict[str, Any]) -> Reply:
        if req["method"] == "GET" and req["path"].startswith("/api/v1/tasks/"):
            task = self.state.get(req["path"].rsplit("/", 1)[1])
            if task is None:
                return Reply(200, {"output": {"task_id": "x", "task_status": "UNKNOWN"}, "request_id": REQUEST_ID})
            task["polls"] += 1
            if task["polls"] < 3:
                status = "PENDING" if task["polls"] == 1 else "RUNNING"
                return Reply(200, {"output": {"task_id": "x", "task_status": status}, "request_id": REQUEST_ID})
            if task["step"] == "refuse":
                return Reply(200, {"output": {"task_id": "x", "task_status": "FAILED", "code": "DataInspectionFailed",
                                              "message": "Output data may contain inappropriate content."},
                                   "request_id": REQUEST_ID})
            step, n = task["step"], task["n"]
            if "results" not in task:
                task["results"] = self.items("ok" if step == "partial" else step, n, *task["size"], task["seed"],
                                             as_url=True)
                if step == "partial" and n > 1:
                    task["results"][1] = {"code": "InternalError.Timeout", "message": "image generation timed out"}
            made = sum("url" in r for r in task["results"])
            return Reply(200, {"output": {"task_id": "x", "task_status": "SUCCEEDED", "results": task["results"],
                                          "task_metrics": {"TOTAL": n, "SUCCEEDED": made, "FAILED": n - made}},
                               "usage": {"image_count": made}, "request_id": REQUEST_ID})
        return super().other(req)
