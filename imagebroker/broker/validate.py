"""Every image a provider returns is decoded and counted: a 200 without the images asked for is an
error, never a success."""

from __future__ import annotations

import io

from PIL import Image

from ..errors import BadProviderResponse
from ..providers.base import ProviderResult
from ..providers.offering import Offering
from ..types import GeneratedImage, ImageRequest

_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def _convert(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    img.save(buf, format=fmt.upper())
    return buf.getvalue()


def validate_images(result: ProviderResult, request: ImageRequest, offering: Offering,
                    hash_now: bool = False) -> tuple[GeneratedImage, ...]:
    """The first `request.n` images, decoded, converted to the asked format; `hash_now` computes their
    SHA-256 here too (for callers on a worker thread)."""
    where = {"provider": offering.provider, "offering": offering.id, "request_id": result.request_id}
    if len(result.images) < request.n:
        raise BadProviderResponse(
            f"asked for {request.n} image(s), got {len(result.images)}", **where)
    out = []
    for i, raw in enumerate(result.images[: request.n]):
        try:
            img = Image.open(io.BytesIO(raw.data))
            img.load()
        except Exception as exc:
            raise BadProviderResponse(f"image {i + 1} does not decode: {exc}", **where) from None
        fmt = _PIL_FORMATS.get(img.format or "", "png")
        data = raw.data
        if request.output_format and request.output_format != fmt:
            data, fmt = _convert(img, request.output_format), request.output_format
        image = GeneratedImage(data=data, format=fmt, width=img.width, height=img.height,  # type: ignore[arg-type]
                               seed=raw.seed)
        if hash_now:
            image.sha256  # noqa: B018 - cached on the image
        out.append(image)
    return tuple(out)
