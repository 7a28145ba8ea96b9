"""Control of a request beyond its prompt: structural control (ControlNet), a control image of a given kind
(canny edges, a depth map, a pose, ...) that the image must follow, with its strength and the part of the
denoising it acts in; and image prompts (IP-Adapter), reference images whose content and style steer it.

The control image is given ready-made, or made here from a source image with `preprocess: true` where
imagebroker can compute it itself (canny edges, with numpy and Pillow), so every provider receives the
same control image and the ledger records what was sent.
"""

from __future__ import annotations

import io
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .inputs import InputImage, read_input

KINDS = ("canny", "depth", "sketch", "pose", "lineart", "scribble", "segmentation", "tile", "normal")
PREPROCESSED = ("canny",)   # the kinds imagebroker can make from a source image
MAX_CONTROLS = 4
MAX_IMAGE_PROMPTS = 4


class Control(BaseModel):
    """One control: `kind`, its `image`, `scale` (how strongly it holds), and `start`/`end`, the fraction of
    the denoising steps in which it acts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    image: InputImage
    scale: float = Field(default=1.0, ge=0.0, le=2.0)
    start: float = Field(default=0.0, ge=0.0, le=1.0)
    end: float = Field(default=1.0, ge=0.0, le=1.0)
    preprocess: bool = False   # `image` was a source image, turned into this kind's control image here
    source: InputImage | None = None   # with preprocess: that source image (for providers that preprocess)

    @model_validator(mode="before")
    @classmethod
    def _read(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        kind = str(data.get("kind", ""))
        if kind not in KINDS:
            raise ValueError(f"control kind {kind!r} is not one of {', '.join(KINDS)}")
        if "image" not in data:
            raise ValueError(f"control {kind}: give its image")
        image = read_input(data["image"], f"control {kind} image")
        if data.get("preprocess"):
            if kind not in PREPROCESSED:
                raise ValueError(f"control {kind}: preprocess can make only {', '.join(PREPROCESSED)} here; "
                                 f"give a ready-made {kind} image")
            data["source"], image = image, canny(image)
        elif data.get("source") is not None:   # a ready-made control image, and what it was made from
            data["source"] = read_input(data["source"], f"control {kind} source")
        data["image"] = image
        return data

    @model_validator(mode="after")
    def _window(self) -> Control:
        if self.start >= self.end:
            raise ValueError(f"control {self.kind}: start {self.start:g} must be before end {self.end:g}")
        return self

    @classmethod
    def parse(cls, text: str) -> Control:
        """`KIND:PATH[:SCALE]`, as the CLI takes it; `KIND+:PATH` makes the control image from PATH."""
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise ValueError(f"--control {text!r}: expected KIND:PATH[:SCALE]")
        path, _, scale = rest.rpartition(":")
        try:
            value = float(scale) if path else None
        except ValueError:
            value = None
        path = path if value is not None else rest
        fields: dict[str, Any] = {"kind": kind.removesuffix("+"), "image": path,
                                  "preprocess": kind.endswith("+")}
        if value is not None:
            fields["scale"] = value
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ValueError(_one_line(exc)) from None

    def key(self) -> tuple[str, str, float, float, float, str | None]:
        """What makes two controls the same: kind, image, scale, window and source (cache and coalescing
        keys)."""
        return self.kind, self.image.sha256, self.scale, self.start, self.end, self.source and self.source.sha256

    def sent_image(self, want: str) -> InputImage:
        """The image a provider gets: the control image, or (`want` source) the image it was made from."""
        return self.source if want == "source" and self.source is not None else self.image

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale, "start": self.start, "end": self.end,
                "preprocess": self.preprocess, "image": self.image.describe(),
                **({"source": self.source.describe()} if self.source is not None else {})}


class ImagePrompt(BaseModel):
    """A reference image (IP-Adapter): the output takes its content and style, `scale` how much (0 is none)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: InputImage
    scale: float = Field(default=1.0, ge=0.0, le=2.0)

    @model_validator(mode="before")
    @classmethod
    def _read(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            data = {"image": data}   # an image on its own: a path, bytes, a PIL image
        if "image" not in data:
            raise ValueError("image prompt: give its image")
        return {**data, "image": read_input(data["image"], "image prompt")}

    @classmethod
    def parse(cls, text: str) -> ImagePrompt:
        """`PATH[:SCALE]`, as the CLI takes it."""
        path, _, scale = text.rpartition(":")
        try:
            fields: dict[str, Any] = {"image": path, "scale": float(scale)} if path else {"image": text}
        except ValueError:
            fields = {"image": text}
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ValueError(_one_line(exc)) from None

    def key(self) -> tuple[str, float]:
        return self.image.sha256, self.scale

    def describe(self) -> dict[str, Any]:
        return {"scale": self.scale, "image": self.image.describe()}


def _one_line(exc: ValidationError) -> str:
    """A validation error as one line, naming the field where the message does not."""
    return "; ".join(str(e["msg"]).removeprefix("Value error, ") if e["loc"] == () else
                     f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def canny(image: InputImage, low: float = 0.1, high: float = 0.2) -> InputImage:
    """Edges as white lines on black (see `canny_edges`). PNG, the source image's size."""
    import numpy as np
    from PIL import Image

    edges = canny_edges(np.asarray(image.pil().convert("RGB")), low, high)
    buf = io.BytesIO()
    Image.fromarray(edges).convert("RGB").save(buf, format="PNG")
    return read_input(buf.getvalue(), f"control canny of {image.name}")


def canny_edges(rgb: Any, low: float = 0.1, high: float = 0.2) -> Any:
    """Canny's detector on an (H, W, 3) uint8 array: Sobel gradients, thinned to their ridges, kept where
    strong or where they touch a strong one (hysteresis). Returns (H, W) uint8, 255 on an edge. The
    training of tiny-shapes' ControlNet uses this same function, so what it learned is what users send."""
    import numpy as np
    from PIL import Image, ImageFilter

    gray = Image.fromarray(np.asarray(rgb, dtype=np.uint8)).convert("L").filter(ImageFilter.GaussianBlur(1.0))
    a = np.asarray(gray, dtype=np.float32) / 255.0
    p = np.pad(a, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.hypot(gx, gy)
    mag = mag / mag.max() if mag.max() > 0 else mag
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    m = np.pad(mag, 1)
    h, w = mag.shape
    neighbours = {0: ((0, 1), (0, -1)), 45: ((1, -1), (-1, 1)), 90: ((1, 0), (-1, 0)), 135: ((1, 1), (-1, -1))}
    sector = (np.round(angle / 45.0).astype(int) % 4) * 45
    thin = np.zeros_like(mag)
    for deg, ((dy1, dx1), (dy2, dx2)) in neighbours.items():
        sel = sector == deg
        n1 = m[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        n2 = m[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep = sel & (mag >= n1) & (mag >= n2)
        thin[keep] = mag[keep]
    strong, weak = thin >= high, thin >= low
    edges = strong.copy()
    for _ in range(max(h, w)):   # grow strong edges into the weak ones they touch
        grown = np.pad(edges, 1)
        near = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= grown[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        new = weak & near & ~edges
        if not new.any():
            break
        edges |= new
    return (edges * 255).astype(np.uint8)
