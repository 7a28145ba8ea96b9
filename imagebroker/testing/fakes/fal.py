"""Fake fal.ai queue: POST /{model} -> handle; GET .../status; GET .../requests/{id}; PUT .../cancel;
images served from /files/. The hostile-URL steps of `bfl.HostileURLs` (`foreign_poll` and
`poll_redirect` move the status URL), and two of fal's own:

    foreign_result   the response URL is on `elsewhere`
    foreign_cancel   the cancel URL is on `elsewhere`, and the request never completes
"""

from __future__ import annotations

import json
from typing import Any

from .base import Reply, seen_image
from .hostile import HostileURLs

UNION_MODES = ("canny", "tile", "depth", "blur", "pose", "gray", "low-quality")
EDIT_ENDPOINTS = {"/fal-ai/flux-pro/kontext": ("image_url",), "/fal-ai/flux/dev/image-to-image": ("image_url",),
                  "/fal-ai/flux-pro/v1/fill": ("image_url", "mask_url")}


class FakeFal(HostileURLs):
    name = "fal"

    def authorised(self, req: dict[str, Any]) -> bool:
        return req["headers"].get("authorization") == f"Key {self.key}"

    def error_body(self, message: str) -> Any:
        return {"detail": message}

    def is_generation(self, req: dict[str, Any]) -> bool:
        return req["method"] == "POST" and "/requests/" not in req["path"]

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        body = json.loads(req["body"])
        if req["path"] in EDIT_ENDPOINTS:   # the output has the input image's size
            seen = {k: seen_image(str(body.get(k, ""))) for k in EDIT_ENDPOINTS[req["path"]]}
            if None in seen.values() or "image_size" in body:
                bad = next((k for k, v in seen.items() if v is None), "image_size")
                return Reply(422, {"detail": [{"loc": ["body", bad], "msg": "field required or not an image",
                                               "type": "value_error"}]})
            if not 0.01 <= float(body.get("strength", 0.95)) <= 1:
                return Reply(422, {"detail": [{"loc": ["body", "strength"], "msg": "must be in 0.01..1"}]})
            self.state.setdefault("edits", []).append({"path": req["path"], "inputs": seen, "body": dict(body)})
            body["image_size"] = {"width": seen["image_url"].width, "height": seen["image_url"].height}
        if req["path"] == "/fal-ai/flux-general" and (bad := self.control_problem(body)) is not None:
            return Reply(422, {"detail": [{"loc": ["body", *bad[0]], "msg": bad[1], "type": "value_error"}]})
        rid = f"req-{self.generations}"
        self.state[rid] = {"step": step, "polls": 0, "body": body}
        base = f"{self.url}{req['path']}/requests/{rid}"
        away = base.replace(self.url, self.elsewhere.url, 1)
        return Reply(200, {"request_id": rid, "response_url": away if step == "foreign_result" else base,
                           "status_url": self.poll_url(step, f"{base}/status"),
                           "cancel_url": f"{away if step == 'foreign_cancel' else base}/cancel"})

    def control_problem(self, body: dict[str, Any]) -> tuple[list[Any], str] | None:
        """flux-general's `controlnet_unions` and `ip_adapters` as its schema reads them (one ControlNet at a
        time; images by URL or data: URI); what was seen is kept in state["controls"]."""
        unions, adapters = body.get("controlnet_unions") or [], body.get("ip_adapters") or []
        if len(unions) + len(body.get("controlnets") or []) > 1:
            return ["controlnet_unions"], "only one controlnet is supported at the moment"
        seen: dict[str, list[Any]] = {"controls": [], "ip_adapters": []}
        for i, union in enumerate(unions):
            if not isinstance(union.get("path"), str) or not union["path"]:
                return ["controlnet_unions", i, "path"], "field required"
            for j, c in enumerate(union.get("controls") or []):
                where = ["controlnet_unions", i, "controls", j]
                if (image := seen_image(str(c.get("control_image_url", "")))) is None:
                    return [*where, "control_image_url"], "field required or not an image"
                if c.get("control_mode") not in UNION_MODES:
                    return [*where, "control_mode"], f"must be one of {', '.join(UNION_MODES)}"
                if not all(0 <= float(c.get(k, d)) <= 1 for k, d in (("start_percentage", 0), ("end_percentage", 1))):
                    return [*where, "start_percentage"], "must be in 0..1"
                seen["controls"].append({**c, "control_image_url": image, "path": union["path"]})
        for i, a in enumerate(adapters):
            for name in ("path", "image_url", "scale", "image_encoder_path"):
                if name not in a:
                    return ["ip_adapters", i, name], "field required"
            if (image := seen_image(str(a["image_url"]))) is None:
                return ["ip_adapters", i, "image_url"], "not an image"
            seen["ip_adapters"].append({**a, "image_url": image})
        if unions or adapters:
            self.state.setdefault("controls", []).append(seen)
        return None

    def other(self, req: dict[str, Any]) -> Reply:
        path = req["path"]
        if "/requests/" in path:
            rid = path.split("/requests/", 1)[1].split("/")[0]
            task = self.state.get(rid)
            if task is None:
                return Reply(404, {"detail": "request not found"})
            if path.endswith("/cancel"):
                task["cancelled"] = True
                return Reply(202, {"status": "CANCELLATION_REQUESTED"})
            if path.endswith("/status"):
                task["polls"] += 1
                done = task["polls"] >= 2 and task["step"] != "foreign_cancel"
                status = "COMPLETED" if done else "IN_QUEUE"
                return Reply(200, {"status": status, "queue_position": 0, "logs": []})
            b, step = task["body"], task["step"]
            size = b["image_size"]
            n = 0 if step == "empty" else b.get("num_images", 1)
            return Reply(200, {"images": [{"url": self.result_url(step, f"{self.url}/files/{rid}-{i}.jpeg"),
                                           "width": size["width"],
                                           "height": size["height"], "content_type": "image/jpeg"}
                                          for i in range(n)],
                               "seed": b.get("seed", 7), "has_nsfw_concepts": [step == "refuse"] * max(n, 1),
                               "prompt": b["prompt"]})
        if path.startswith("/files/"):
            rid, i = path.rsplit("/", 1)[1].removesuffix(".jpeg").rsplit("-", 1)
            task = self.state[rid]
            size = task["body"]["image_size"]
            seed = task["body"].get("seed")
            return Reply(200, self.images(task["step"], 1, size["width"], size["height"],
                                          None if seed is None else seed + int(i), "jpeg")[0],
                         content_type="image/jpeg")
        return super().other(req)
