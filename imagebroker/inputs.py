"""Input images for edits: the init image, reference images and the mask, checked before anything is paid.

One mask convention for imagebroker: **white = change, black = keep** (a greyscale image, or any image
read as its luminance; grey values are partial where a provider blends, and are cut at 50% where it
wants a hard mask). Each provider's own convention is made from it here, once:

- `alpha_mask`: OpenAI's, a PNG whose *transparent* pixels are the ones to change;
- `white_mask`: FLUX Fill's, Stability's, Diffusers' and ComfyUI's, a greyscale PNG, white = change.

An `InputImage` keeps the caller's bytes exactly (they are what is sent, and what the cache key hashes);
PIL images and paths are read into bytes once, when the request is made.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

MAX_INPUT_IMAGES = 16                 # OpenAI's limit for images.edit, the highest of any provider here
MAX_INPUT_BYTES = 50 * 2**20          # OpenAI's per-file limit
MAX_INPUT_PIXELS = 64 * 2**20         # 8192 x 8192: refused before a pixel is decoded
MIN_INPUT_SIDE = 16
InputFormat = Literal["png", "jpeg", "webp"]
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "MPO": "jpeg"}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class InputImage(BaseModel):
    """One input image: its bytes as given, and what was read of them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: bytes = Field(repr=False)
    format: InputFormat
    width: int
    height: int
    has_alpha: bool = False
    name: str = "image"     # what the caller called it (a file name), for messages only

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1_000_000

    @property
    def mime(self) -> str:
        return MIME[self.format]

    def data_url(self) -> str:
        return data_url(self.data, self.mime)

    def b64(self) -> str:
        return base64.b64encode(self.data).decode()

    def pil(self) -> Image.Image:
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image

    def describe(self) -> dict[str, Any]:
        """What the ledger and provenance keep of it: never the bytes."""
        return {"sha256": self.sha256, "format": self.format, "width": self.width, "height": self.height}


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def read_input(value: Any, what: str = "image") -> InputImage:
    """An InputImage from bytes, a path, a PIL image or an InputImage; ValueError naming `what` (and the
    file) when it is not a readable PNG, JPEG or WebP within the limits."""
    if isinstance(value, InputImage):
        return value
    name = what
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        name = f"{what} {path}"
        try:
            if path.stat().st_size > MAX_INPUT_BYTES:
                raise ValueError(f"{name}: {path.stat().st_size} bytes, above {MAX_INPUT_BYTES >> 20} MiB")
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{name}: cannot read it ({exc.strerror or type(exc).__name__})") from None
        return _from_bytes(data, name)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return _from_bytes(buf.getvalue(), what)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(value), what)
    if isinstance(value, dict):   # a serialised InputImage (model_dump): read again from its bytes, never trusted
        data = value.get("data")
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"{what}: a dict without its bytes under 'data'")
        return _from_bytes(bytes(data), what)
    raise ValueError(f"{what}: give bytes, a path or a PIL image, not {type(value).__name__}")


def _from_bytes(data: bytes, name: str) -> InputImage:
    if len(data) > MAX_INPUT_BYTES:
        raise ValueError(f"{name}: {len(data)} bytes, above {MAX_INPUT_BYTES >> 20} MiB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = _PIL_FORMATS.get(image.format or "")
            if fmt is None:
                raise ValueError(f"{name}: a {image.format} image; give PNG, JPEG or WebP")
            w, h = image.size
            if w * h > MAX_INPUT_PIXELS:
                raise ValueError(f"{name}: {w}x{h} is above {MAX_INPUT_PIXELS >> 20} megapixels")
            if min(w, h) < MIN_INPUT_SIDE:
                raise ValueError(f"{name}: {w}x{h} is below {MIN_INPUT_SIDE} px a side")
            alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            image.load()   # decodable, not just a header
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{name}: not a readable image ({type(exc).__name__})") from None
    return InputImage(data=data, format=fmt, width=w, height=h, has_alpha=alpha, name=name)


def mask_image(mask: InputImage) -> Image.Image:
    """The mask as a greyscale image, white = change (what every conversion below starts from)."""
    image = mask.pil()
    if image.mode in ("RGBA", "LA") and image.getextrema()[-1][0] < 255 and _flat(image.convert("L")):
        # a mask drawn as transparency on a flat layer (an OpenAI-style mask): transparent = change
        return Image.eval(image.getchannel("A"), lambda a: 255 - a)
    return image.convert("L")


def _flat(image: Image.Image) -> bool:
    lo, hi = image.getextrema()
    return hi - lo < 8


def white_mask(mask: InputImage) -> bytes:
    """The mask as a greyscale PNG, white = change (FLUX Fill, Stability, Diffusers, ComfyUI)."""
    buf = io.BytesIO()
    mask_image(mask).save(buf, format="PNG")
    return buf.getvalue()


def black_mask(mask: InputImage) -> bytes:
    """The mask inverted, as Ideogram wants it: a black-and-white PNG, black = change (cut at 50%)."""
    buf = io.BytesIO()
    mask_image(mask).point(lambda v: 0 if v >= 128 else 255).save(buf, format="PNG")
    return buf.getvalue()


def alpha_mask(mask: InputImage) -> bytes:
    """The mask as OpenAI wants it: an RGBA PNG, fully transparent where the image is to change (white in
    imagebroker's convention, cut at 50%), opaque elsewhere."""
    lum = mask_image(mask)
    alpha = lum.point(lambda v: 0 if v >= 128 else 255)
    image = Image.new("RGBA", lum.size, (0, 0, 0, 255))
    image.putalpha(alpha)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
