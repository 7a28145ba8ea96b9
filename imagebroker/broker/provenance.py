"""Provenance for an image without touching its bytes: a sidecar record beside the file, or, on request, a
PNG `iTXt` chunk inserted before IEND (the pixels and every other chunk stay byte for byte). An image that
carries the provider's C2PA content credentials is never changed: an added chunk would make its manifest
read as tampered."""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any

from ..errors import RequestError
from ..types import GeneratedImage, ImageRequest, ImageResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEYWORD = "imagebroker"


def record(result: ImageResult, request: ImageRequest, index: int, *, store_prompt: bool) -> dict[str, Any]:
    """What is known of one image: the call, the offering, the prompt (or its hash), seed, what was applied
    and dropped, and the cost of the call it came from."""
    image = result.images[index]
    applied = {k: v for k, v in result.applied.items()
               if store_prompt or k not in ("prompt", "negative_prompt", "negative")}   # a provider may echo them
    return {"generator": "imagebroker", "request_id": result.request_id, "index": index,
            "offering": result.offering, "sha256": image.sha256, "format": image.format,
            "width": image.width, "height": image.height, "seed": image.seed,
            "prompt": request.prompt if store_prompt else None, "prompt_sha256": request.prompt_sha256(),
            "negative_prompt": request.negative_prompt if store_prompt else None,
            "applied": applied, "dropped": list(result.dropped), "c2pa": image.c2pa,
            "inputs": {"images": [i.describe() for i in request.images], "strength": request.strength,
                       "mask": request.mask.describe() if request.mask else None} if request.is_edit else None,
            "c2pa_verification": c2pa_verification(image),
            "cost": {"usd": None if result.cost.usd is None else str(result.cost.usd),
                     "status": result.cost.status, "unit": result.cost.unit}}


MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def c2pa_verification(image: GeneratedImage) -> str | None:
    """What c2pa-python (the `[c2pa]` extra) says of the image's content credentials: `valid`, `trusted`,
    `invalid: why`, or `not verified` when the library is not installed; None when it carries none."""
    if not image.c2pa:
        return None
    try:
        import c2pa
    except ImportError:
        return "not verified (pip install 'imagebroker[c2pa]')"
    try:
        report = json.loads(c2pa.Reader(MIME[image.format], io.BytesIO(image.data)).json())
    except Exception as exc:   # the library's errors are its own classes: a manifest it cannot verify
        return f"invalid: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    state = report.get("validation_state")
    if state:
        return str(state).lower()
    failures = [s.get("code", "?") for s in report.get("validation_status") or []]
    return "invalid: " + ", ".join(failures) if failures else "valid"


def sidecar(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=2, default=str, ensure_ascii=False) + "\n").encode()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def embed_png(image: GeneratedImage, meta: dict[str, Any]) -> bytes:
    """The PNG with `meta` as an uncompressed UTF-8 `iTXt` chunk just before IEND, every other byte as it
    was. Refused for a non-PNG, and for an image with C2PA content credentials."""
    if image.format != "png":
        raise RequestError(f"provenance can be embedded in PNG only, not {image.format}: it is in the sidecar")
    if image.c2pa:
        raise RequestError("the image carries C2PA content credentials, which an added chunk would break: its "
                           "provenance is in the sidecar only")
    data = image.data
    iend = data.rfind(b"IEND") - 4   # the length field before the chunk type
    if not data.startswith(PNG_SIGNATURE) or iend < len(PNG_SIGNATURE):
        raise RequestError("not a whole PNG: no IEND chunk")
    text = json.dumps(meta, default=str, ensure_ascii=False).encode()
    body = KEYWORD.encode("latin-1") + b"\0" + b"\0\0" + b"\0" + b"\0" + text   # uncompressed, no language
    return data[:iend] + _chunk(b"iTXt", body) + data[iend:]
