"""Every image a provider returns is checked before the call counts as a success: a 200 without the
images asked for, or with images other than those asked for, is a `BadProviderResponse`.

The checks, cheapest first, so a hostile answer costs little:

1. count: fewer than `n` images is an error; more are cut to the first `n` (the provider's usage
   still bills what it sent: `len(result.images)` is the count received, for the caller to flag),
   but more than `max_images(n)` is an error, not a bill to pay;
2. bytes: each image at most `ImageLimits.max_bytes`, checked before anything is parsed;
3. format: the real format, read from the bytes (PNG, JPEG or WebP; GIF, TIFF, BMP... are refused,
   never converted: the offering declared what it returns, and a different format is its bug);
4. structure and header, read without decoding a pixel: the file must end where the format says
   (PNG at IEND, JPEG at EOI, WebP at its RIFF length), so `valid PNG + 200 MB of junk` is refused;
5. pixels: at most `max_pixel_ratio` times the pixels asked, and `max_pixels` in any case, from the
   header alone, so a 13000x13000 bomb is refused before PIL allocates its 676 MB;
6. size: the size asked (the request's, else the offering's default), or one of the offering's
   declared fixed `capabilities.sizes`; a canvas offering (ComfyUI) asked no size may return any size
   its size rule allows (its graph decides), and an edit offering that picks its own size from the init
   image (`edit.output_size: any`, FLUX Kontext) any size at all, within the pixel bound of 5;
7. integrity: a PNG's chunk checksums are verified during the walk in 4 (what PIL's `verify()` checks).
   The pixels themselves are decoded (by PIL, which must then agree with the header read in 4) only to
   convert to another `output_format`, or when
   `ImageLimits.decode_pixels` asks for it: a full decode costs 15-25 ms per megapixel of CPU (zlib's
   inflate is most of it), as much as the whole round trip to a fast provider, for a failure (a
   CRC-valid file with a corrupt compressed stream) that the checks above make improbable.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import BadProviderResponse
from ..policies.schema import ImageChecks
from ..providers.base import ProviderResult
from ..providers.offering import Offering, request_size
from ..types import GeneratedImage, ImageRequest

_PIL_NAME = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_OTHER_FORMATS = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                  (b"BM", "BMP"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\xff\x0a", "JPEG XL"),
                  (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"qoif", "QOI"))
# what PIL raises on bytes that parse but do not decode (an unexpected one is a bug, not a bad answer)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
# JPEG markers that start a frame (SOF0..SOF15 less DHT, JPG and DAC) and carry its size
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


ImageLimits = ImageChecks  # the policy's `images:` section
DEFAULT_LIMITS = ImageChecks()
MAX_IMAGE_BYTES = DEFAULT_LIMITS.max_bytes


class _Refused(Exception):
    """Internal: why one image is refused; becomes a BadProviderResponse naming the image."""


@dataclass(frozen=True)
class _Header:
    format: str  # png | jpeg | webp
    width: int
    height: int
    end: int  # offset just past the format's end marker
    c2pa: bool = False  # carries a C2PA manifest store (PNG caBX chunk, JPEG APP11 JUMBF, WebP C2PA chunk)


def validate_images(result: ProviderResult, request: ImageRequest, offering: Offering,
                    hash_now: bool = False, *, limits: ImageLimits = DEFAULT_LIMITS,
                    ) -> tuple[GeneratedImage, ...]:
    """The first `request.n` images, checked (see the module docstring), decoded and converted to the
    asked format; `hash_now` computes their SHA-256 here too (for callers on a worker thread).
    `result` is not changed: `len(result.images)` remains the count the provider sent."""
    where = {"provider": offering.provider, "offering": offering.id, "request_id": result.request_id}
    got, n = len(result.images), request.n
    if got < n:
        raise BadProviderResponse(f"asked for {n} image(s), got {got}", **where)
    if got > limits.max_images(n):
        raise BadProviderResponse(f"asked for {n} image(s), got {got}: more than the "
                                  f"{limits.max_images(n)} accepted in one answer", **where)
    asked = request_size(request, offering)
    out = []
    for i, raw in enumerate(result.images[:n]):
        try:
            image = _check(raw.data, raw.seed, request, offering, asked, limits)
        except _Refused as exc:
            raise BadProviderResponse(f"image {i + 1} {exc}", **where) from None
        if hash_now:
            image.sha256  # noqa: B018 - cached on the image
        out.append(image)
    return tuple(out)


def _check(data: bytes, seed: int | None, request: ImageRequest, offering: Offering,
           asked: tuple[int, int], limits: ImageLimits) -> GeneratedImage:
    if len(data) > limits.max_bytes:
        raise _Refused(f"is {_mib(len(data))}, above the {_mib(limits.max_bytes)} limit per image")
    head = _read_header(data)
    trailing = len(data) - head.end
    if trailing > limits.max_trailing_zeros or (trailing and data[head.end:].strip(b"\0")):
        mark = {"png": "its IEND chunk", "jpeg": "its EOI marker", "webp": "its RIFF length"}[head.format]
        raise _Refused(f"has {trailing} byte(s) after {mark}")
    w, h = head.width, head.height
    most = min(limits.max_pixels, int(limits.max_pixel_ratio * asked[0] * asked[1]))
    if w * h > most:
        why = (f"{limits.max_pixel_ratio:g}x the {asked[0]}x{asked[1]} asked"
               if most < limits.max_pixels else "the cap for any request")
        raise _Refused(f"is {w}x{h} ({w * h / 1e6:.1f} MP), above the {most / 1e6:.1f} MP limit ({why})")
    if problem := _size_problem(w, h, request, offering, asked):
        raise _Refused(problem)
    fmt = head.format
    convert = bool(request.output_format and request.output_format != fmt)
    if not (convert or limits.decode_pixels):  # the structure (and a PNG's checksums) was checked above
        return GeneratedImage(data=data, format=fmt, width=w, height=h, seed=seed,  # type: ignore[arg-type]
                              c2pa=head.c2pa)
    try:
        img = Image.open(io.BytesIO(data), formats=[_PIL_NAME[head.format]])  # shares, does not copy
        img.load()
    except _DECODE_ERRORS as exc:
        raise _Refused(f"does not decode: {_one_line(exc)}") from None
    if img.size != (w, h):
        raise _Refused(f"header says {w}x{h} but decodes as {img.width}x{img.height}")
    if convert:
        data, fmt = _convert(img, request.output_format), request.output_format  # type: ignore[arg-type]
    # a converted image no longer carries the provider's content credentials (they signed the original)
    return GeneratedImage(data=data, format=fmt, width=w, height=h, seed=seed,  # type: ignore[arg-type]
                          c2pa=head.c2pa and not convert)


def describe(data: bytes) -> tuple[str, int, int, bool]:
    """Format, width, height and whether it carries C2PA content credentials, read from an image's
    structure (an image this module accepted once: read back from the store)."""
    try:
        head = _read_header(data)
    except _Refused as exc:
        raise ValueError(f"not an image imagebroker stores: {exc}") from None
    return head.format, head.width, head.height, head.c2pa


def _size_problem(w: int, h: int, request: ImageRequest, offering: Offering,
                  asked: tuple[int, int]) -> str | None:
    caps = offering.capabilities
    if (w, h) == asked or f"{w}x{h}" in caps.sizes:
        return None
    if offering.kind == "canvas" and not request.width and caps.size_problem(w, h) is None:
        return None  # asked no size: the node graph decides, within what the offering declares
    edit = caps.edit
    if request.is_edit and edit is not None and edit.output_size == "any":
        return None  # it picks the size from the init image's aspect ratio (the pixel bound still holds)
    offered = f" nor one of the offered sizes ({', '.join(caps.sizes)})" if caps.sizes else ""
    return f"is {w}x{h}, not the {asked[0]}x{asked[1]} asked{offered}"


def _read_header(data: bytes) -> _Header:
    """Format, size and end of an image from its structure alone (no pixel is decoded); raises
    `_Refused` for anything but a whole PNG, JPEG or WebP file."""
    try:
        if data.startswith(_PNG_SIGNATURE):
            return _png(data)
        if data.startswith(b"\xff\xd8\xff"):
            return _jpeg(data)
        if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            return _webp(data)
    except (struct.error, IndexError):
        raise _Refused("is truncated") from None
    for magic, name in _OTHER_FORMATS:
        if data.startswith(magic):
            raise _Refused(f"is {name}, not PNG, JPEG or WebP")
    if data[4:8] == b"ftyp":
        raise _Refused(f"is {data[8:12].decode('latin-1').strip() or 'ISO-BMFF'} (HEIF/AVIF), "
                       "not PNG, JPEG or WebP")
    raise _Refused(f"does not decode: not a PNG, JPEG or WebP file (starts {data[:8]!r})")


def _png(data: bytes) -> _Header:
    length, kind, w, h = struct.unpack_from(">I4sII", data, 8)
    if kind != b"IHDR" or length != 13:
        raise _Refused("is not a valid PNG: IHDR is not its first chunk")
    pos, size, view, c2pa = 8, len(data), memoryview(data), False
    while pos + 12 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > size:
            break
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[pos + 4:end - 4]) != crc:  # what PIL's verify() checks, without PIL
            raise _Refused(f"is a damaged PNG: the {kind.decode('latin-1')!r} chunk fails its checksum")
        pos = end
        c2pa = c2pa or kind == b"caBX"
        if kind == b"IEND":
            return _Header("png", w, h, pos, c2pa)
    raise _Refused("is truncated: the PNG has no IEND chunk")


def _jpeg(data: bytes) -> _Header:
    pos, size, dims, c2pa = 2, len(data), None, False
    while pos + 2 <= size:
        if data[pos] != 0xFF:
            raise _Refused(f"is not a valid JPEG: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            if dims is None:
                raise _Refused("is not a valid JPEG: no frame header")
            return _Header("jpeg", dims[0], dims[1], pos + 2, c2pa)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn and TEM have no length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _JPEG_SOF:
            h, w = struct.unpack_from(">HH", data, pos + 5)
            dims = (w, h)
        elif marker == 0xEB and b"jumb" in data[pos + 4:pos + 2 + length]:   # APP11: a JUMBF box
            c2pa = True
        pos += 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data up to the next marker not stuffing or RSTn
            while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < size and (
                    data[pos + 1] in (0x00, 0xFF) or 0xD0 <= data[pos + 1] <= 0xD7):
                pos += 1
            if pos < 0:
                break
    raise _Refused("is truncated: the JPEG has no EOI marker")


def _webp(data: bytes) -> _Header:
    (riff,) = struct.unpack_from("<I", data, 4)
    end = 8 + riff + (riff & 1)
    if end > len(data):
        raise _Refused("is truncated: shorter than its RIFF length")
    kind = data[12:16]
    if kind == b"VP8X":  # extended: 24-bit canvas width-1 and height-1
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
    elif kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes after the start code
        w, h = (v & 0x3FFF for v in struct.unpack_from("<HH", data, 26))
    elif kind == b"VP8L" and data[20] == 0x2F:  # lossless: 14-bit width-1, height-1
        (bits,) = struct.unpack_from("<I", data, 21)
        w, h = (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1
    else:
        raise _Refused(f"is not a valid WebP: unknown first chunk {kind!r}")
    pos, c2pa = 12, False
    while pos + 8 <= end and not c2pa:
        (length,) = struct.unpack_from("<I", data, pos + 4)
        c2pa = data[pos:pos + 4] == b"C2PA"
        pos += 8 + length + (length & 1)
    return _Header("webp", w, h, end, c2pa)


def _convert(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    img.save(buf, format=fmt.upper())
    return buf.getvalue()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _one_line(exc: Any) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
