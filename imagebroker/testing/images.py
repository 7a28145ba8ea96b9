"""Small real images for fakes and tests: a solid colour derived from a seed, in any format."""

from __future__ import annotations

import hashlib
import io

from PIL import Image


def colour_for(seed: int | None, prompt: str = "") -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return digest[0], digest[1], digest[2]


def make_image(width: int, height: int, *, seed: int | None = None, prompt: str = "",
               fmt: str = "png") -> bytes:
    img = Image.new("RGB", (width, height), colour_for(seed, prompt))
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()
