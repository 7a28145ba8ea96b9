"""What the fakes of OpenAI-shaped image APIs share (xAI, Recraft, BytePlus, Azure): one POST per
generation, images in `data[]` as `b64_json` or as a URL this fake serves (`GET /files/{id}`), and a body
each fake reads and answers by its own provider's rules."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from PIL import Image

from .base import FakeServer, Reply, Seen, seen_image


def inputs_seen(values: list[str]) -> list[Seen] | None:
    """The input images a JSON body carried as data: URIs or base64 (None: one is not an image)."""
    seen = [seen_image(v) for v in values]
    return None if any(s is None for s in seen) else seen  # type: ignore[return-value]


def bytes_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


class FakeImagesApi(FakeServer):
    """Subclasses implement `answer` (the reply to one generation: a dict body or a Reply)."""

    paths: tuple[str, ...] = ()

    def is_generation(self, req: dict[str, Any]) -> bool:
        return req["method"] == "POST" and req["path"] in self.paths

    def generate(self, req: dict[str, Any], step: str) -> Reply:
        return self.answer(req, step)

    def answer(self, req: dict[str, Any], step: str) -> Reply:
        raise NotImplementedError

    def items(self, step: str, n: int, w: int, h: int, seed: int | None, *, as_url: bool,
              fmt: str = "png") -> list[dict[str, Any]]:
        """`data[]` for n images: base64, or URLs on this fake (fetched later, as the real ones are)."""
        out = []
        for image in self.images(step, n, w, h, seed, fmt):
            if as_url:
                files = self.state.setdefault("files", {})
                name = f"f{len(files)}.{fmt}"
                files[name] = image
                out.append({"url": f"{self.url}/files/{name}"})
            else:
                out.append({"b64_json": base64.b64encode(image).decode()})
        return out

    def other(self, req: dict[str, Any]) -> Reply:
        if req["method"] == "GET" and req["path"].startswith("/files/"):
            data = self.state.get("files", {}).get(req["path"].rsplit("/", 1)[1])
            if data is None:
                return Reply(404, b"not found", content_type="text/plain")
            self.state["downloads"] = self.state.get("downloads", 0) + 1
            return Reply(200, data, content_type="image/png")
        return super().other(req)

    @staticmethod
    def json_body(req: dict[str, Any]) -> dict[str, Any]:
        return json.loads(req["body"])
