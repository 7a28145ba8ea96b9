"""Small real images for fakes and tests: a solid colour derived from a seed, in any format, and the
hostile ones a misbehaving provider sends (a PNG whose header claims 13000x13000 pixels)."""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import zlib

from PIL import Image

_DEFLATE_BLOCK = 1 << 20  # zero bytes per repeated compressed block in `make_huge_png`


def colour_for(seed: int | None, prompt: str = "") -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return digest[0], digest[1], digest[2]


def make_image(width: int, height: int, *, seed: int | None = None, prompt: str = "",
               fmt: str = "png") -> bytes:
    img = Image.new("RGB", (width, height), colour_for(seed, prompt))
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


C2PA_STORE = b"\x00\x00\x00\x20jumb\x00\x00\x00\x18jumdc2pa\x00\x11\x00\x10\x80\x00\xaa\x00\x38\x9b\x71"
# (the start of a JUMBF manifest store: a `jumb` superbox whose description box is labelled c2pa; no
#  signature inside, so it is present but would not verify)


def with_c2pa(data: bytes) -> bytes:
    """The image with a C2PA manifest store where the format keeps one: a PNG `caBX` chunk before IEND,
    a JPEG APP11 segment right after SOI. Nothing else changes."""
    if data.startswith(b"\x89PNG"):
        iend = data.rfind(b"IEND") - 4
        return data[:iend] + _chunk(b"caBX", C2PA_STORE) + data[iend:]
    if data.startswith(b"\xff\xd8"):
        body = b"JP\x00\x01\x00\x00\x00\x01" + C2PA_STORE   # JPEG XT box header, then the box
        return data[:2] + b"\xff\xeb" + struct.pack(">H", len(body) + 2) + body + data[2:]
    raise ValueError("with_c2pa takes a PNG or a JPEG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zlib_zeros(total: int) -> bytes:
    """A zlib stream that inflates to `total` zero bytes, in milliseconds however large `total` is:
    after a full flush a compressor forgets what came before, so the compressed form of one block of
    zeros can be repeated; the Adler-32 of n zeros is (n mod 65521) << 16 | 1."""
    full, rest = divmod(total, _DEFLATE_BLOCK)
    c = zlib.compressobj(9)
    head = c.compress(bytes(_DEFLATE_BLOCK)) + c.flush(zlib.Z_FULL_FLUSH)
    block = head[2:]  # without the 2-byte zlib header
    tail = zlib.compressobj(9)
    last = (tail.compress(bytes(rest)) + tail.flush(zlib.Z_FULL_FLUSH))[2:] if rest else b""
    final = b"\x03\x00"  # an empty final block with fixed Huffman codes
    return head[:2] + block * full + last + final + struct.pack(">I", (total % 65521) << 16 | 1)


@functools.lru_cache(maxsize=4)
def make_huge_png(width: int, height: int) -> bytes:
    """A valid black RGB PNG of `width` x `height` that is small on the wire (13000x13000: 500 KB)
    but decodes to width * height * 4 bytes of memory: what a decompression bomb looks like."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = _zlib_zeros(height * (1 + 3 * width))  # each row: filter type 0, then zero pixels
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
