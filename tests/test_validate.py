"""What a provider returns is checked before it is paid for as a success: count, bytes, real format,
trailing data, pixels and size, each refusal a BadProviderResponse naming the image."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from decimal import Decimal

import pytest
from PIL import Image

from imagebroker import AsyncBroker
from imagebroker.broker.validate import MAX_IMAGE_BYTES, ImageLimits, validate_images
from imagebroker.errors import AllAttemptsFailed, BadProviderResponse
from imagebroker.policies.schema import Policy
from imagebroker.providers.base import ProviderResult, RawImage
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.testing.fakes import JUNK, fakes
from imagebroker.testing.images import make_huge_png, make_image
from imagebroker.testing.mock import MockProvider, mock_offering
from imagebroker.types import ImageRequest
from tests.conftest import builtin_providers

TOGETHER = "together/black-forest-labs/FLUX.1-schnell"  # size rule, default 1024x1024, max_n 4
GOOGLE = "google/gemini-3.1-flash-image"  # a fixed size list
CATALOG = builtin_catalog()


def check(*images: bytes, offering: str = TOGETHER, limits: ImageLimits | None = None, **request):
    request = {"prompt": "a red circle", **request}
    result = ProviderResult([RawImage(d, i) for i, d in enumerate(images)], request_id="r-1")
    kw = {"limits": limits} if limits else {}
    return validate_images(result, ImageRequest(**request), CATALOG.resolve(offering), **kw)


def refused(*images: bytes, **kw) -> str:
    with pytest.raises(BadProviderResponse) as exc:
        check(*images, **kw)
    assert exc.value.retryable is False and exc.value.request_id == "r-1"
    assert "\n" not in str(exc.value)
    return str(exc.value)


def noise(w: int, h: int, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (w, h), os.urandom(w * h * 3)).save(buf, format=fmt, **save)
    return buf.getvalue()


# -- what passes, passes unchanged -----------------------------------------------------------------
@pytest.mark.parametrize("fmt, save", [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}),
                                       ("JPEG", {"restart_marker_blocks": 1}), ("WEBP", {}),
                                       ("WEBP", {"lossless": True})])
def test_png_jpeg_and_webp_of_the_asked_size_pass_exactly_as_received(fmt, save):
    data = noise(512, 256, fmt, **save)
    (image,) = check(data, size="512x256")
    assert (image.format, image.width, image.height) == (fmt.lower(), 512, 256)
    assert image.data is data  # not copied, not re-encoded


def test_the_asked_output_format_is_still_converted_to():
    (image,) = check(make_image(64, 64), offering="local/tiny-shapes", output_format="jpeg")
    assert image.format == "jpeg" and Image.open(io.BytesIO(image.data)).format == "JPEG"


# -- count -------------------------------------------------------------------------------------------
def test_a_few_images_more_than_asked_keep_the_first_n_and_leave_the_count_received():
    images = [make_image(1024, 1024, seed=s) for s in range(5)]  # n=1 accepts up to max(2, 1 + 4)
    result = ProviderResult([RawImage(d, i) for i, d in enumerate(images)])
    out = validate_images(result, ImageRequest(prompt="x"), CATALOG.resolve(TOGETHER))
    assert [i.data for i in out] == images[:1] and len(result.images) == 5


@pytest.mark.parametrize("n, limit", [(1, 5), (2, 6), (4, 8), (8, 16)])
def test_far_more_images_than_asked_is_an_error(n, limit):
    image = make_image(1024, 1024)
    assert ImageLimits().max_images(n) == limit  # max(2n, n + 4)
    assert len(check(*[image] * limit, n=n)) == n
    assert refused(*[image] * (limit + 1), n=n) == (
        f"asked for {n} image(s), got {limit + 1}: more than the {limit} accepted in one answer")


def test_fewer_images_than_asked_is_still_an_error():
    assert "asked for 2 image(s), got 1" in refused(make_image(1024, 1024), n=2)


# -- size and pixels -----------------------------------------------------------------------------------
def test_a_tiny_image_for_a_large_request_is_refused_naming_the_image():
    good, tiny = make_image(1024, 1024), make_image(8, 8)
    assert refused(good, tiny, n=2).endswith("image 2 is 8x8, not the 1024x1024 asked")


def test_without_a_size_the_offering_default_is_what_was_asked():
    assert check(make_image(1024, 1024))[0].width == 1024
    assert "is 512x512, not the 1024x1024 asked" in refused(make_image(512, 512))
    assert check(make_image(64, 64), offering="local/tiny-shapes")[0].width == 64
    assert "not the 64x64 asked" in refused(make_image(128, 128), offering="local/tiny-shapes")


def test_a_size_the_offering_declares_in_its_fixed_list_is_accepted():
    assert check(make_image(832, 1248), offering=GOOGLE)[0].height == 1248
    message = refused(make_image(1000, 1000), offering=GOOGLE)
    assert "not the 1024x1024 asked nor one of the offered sizes (1024x1024, 832x1248" in message


def test_a_canvas_graph_decides_the_size_only_when_none_was_asked():
    assert check(make_image(768, 512), offering="comfyui/sdxl")[0].width == 768
    assert "not the 512x512 asked" in refused(make_image(768, 512), offering="comfyui/sdxl", size="512x512")
    assert "is 8x8" in refused(make_image(8, 8), offering="comfyui/sdxl")  # below its size rule


def test_a_huge_header_is_refused_without_decoding_it():
    t0 = time.perf_counter()
    message = refused(make_huge_png(13000, 13000))
    assert time.perf_counter() - t0 < 0.5  # decoding it takes seconds
    assert message.endswith("image 1 is 13000x13000 (169.0 MP), above the 4.2 MP limit "
                            "(4x the 1024x1024 asked)")


def test_pixels_are_bounded_relative_to_the_request_even_for_declared_sizes():
    assert "above the 4.2 MP limit" in refused(make_huge_png(4096, 4096), offering=GOOGLE)
    assert check(make_huge_png(4096, 4096), offering=GOOGLE, size="4096x4096")[0].width == 4096


def test_an_absolute_pixel_cap_holds_whatever_was_asked():
    message = refused(make_huge_png(1024, 1024), limits=ImageLimits(max_pixels=1_000_000))
    assert "above the 1.0 MP limit (the cap for any request)" in message


def test_a_huge_header_costs_little_memory():
    """In a fresh process: decoding the 13000x13000 PNG took the RSS up by ~650 MiB."""
    code = textwrap.dedent(f"""
        import resource
        from imagebroker.broker.validate import validate_images
        from imagebroker.errors import BadProviderResponse
        from imagebroker.providers.base import ProviderResult, RawImage
        from imagebroker.providers.catalog import builtin_catalog
        from imagebroker.testing.images import make_huge_png
        from imagebroker.types import ImageRequest
        result = ProviderResult([RawImage(make_huge_png(13000, 13000))])
        offering = builtin_catalog().resolve("{TOGETHER}")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            validate_images(result, ImageRequest(prompt="x"), offering)
        except BadProviderResponse:
            print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 16, out  # MiB


# -- bytes, format, structure --------------------------------------------------------------------------
def test_bytes_above_the_limit_are_refused_before_parsing():
    assert MAX_IMAGE_BYTES == 64 * 2**20
    data = noise(1024, 1024, "PNG")
    message = refused(data, limits=ImageLimits(max_bytes=len(data) - 1))
    assert f"image 1 is {len(data) / 2**20:.1f} MiB, above the" in message and "limit per image" in message


@pytest.mark.parametrize("fmt, name", [("gif", "GIF"), ("tiff", "TIFF"), ("bmp", "BMP"), ("ico", "ICO")])
def test_formats_other_than_png_jpeg_webp_are_refused_never_relabelled(fmt, name):
    data = make_image(64, 64, fmt=fmt)
    assert refused(data, offering="local/tiny-shapes").endswith(f"image 1 is {name}, not PNG, JPEG or WebP")
    assert refused(data, offering="local/tiny-shapes", output_format="png")  # nor converted


def test_an_isobmff_file_is_named():
    avif = struct.pack(">I", 28) + b"ftypavif" + bytes(16)
    assert "is avif (HEIF/AVIF), not PNG, JPEG or WebP" in refused(avif)


def test_bytes_that_are_no_image_do_not_decode():
    assert "image 1 does not decode: not a PNG, JPEG or WebP file" in refused(b"not an image at all")


@pytest.mark.parametrize("fmt, mark", [("PNG", "its IEND chunk"), ("JPEG", "its EOI marker"),
                                       ("WEBP", "its RIFF length")])
def test_trailing_junk_after_the_image_end_is_refused(fmt, mark):
    data = noise(1024, 1024, fmt) + JUNK
    assert refused(data).endswith(f"image 1 has {len(JUNK)} byte(s) after {mark}")


def test_a_little_nul_padding_is_tolerated_and_kept():
    data = make_image(1024, 1024) + bytes(16)
    assert check(data)[0].data == data  # stored as received
    assert "has 17 byte(s) after its IEND chunk" in refused(make_image(1024, 1024) + bytes(17))
    assert "has 2 byte(s) after" in refused(make_image(1024, 1024) + b"\0x")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_truncated_image_is_refused(fmt):
    data = noise(256, 256, fmt)
    assert "image 1 is truncated" in refused(data[: len(data) // 2], size="256x256")


def test_a_well_formed_file_whose_pixels_do_not_decode_is_refused():
    data = bytearray(make_huge_png(256, 256))
    idat = data.index(b"IDAT") + 4
    data[idat:idat + 8] = b"\xff" * 8  # not a zlib stream; the chunk structure stays whole
    assert "image 1 is a damaged PNG: the 'IDAT' chunk fails its checksum" in refused(bytes(data), size="256x256")


def test_a_stream_corrupt_under_valid_checksums_is_caught_when_pixels_are_decoded():
    """By default the pixels are not decoded (the chunk CRCs are checked); `decode_pixels` decodes."""
    data = bytearray(make_huge_png(256, 256))
    start = data.index(b"IDAT")
    length = int.from_bytes(data[start - 4:start], "big")
    data[start + 4:start + 12] = b"\xff" * 8
    data[start + 4 + length:start + 8 + length] = zlib.crc32(bytes(data[start:start + 4 + length])).to_bytes(4, "big")
    assert check(bytes(data), size="256x256")[0].data == bytes(data)  # the default trusts valid checksums
    assert "image 1 does not decode" in refused(bytes(data), size="256x256", limits=ImageLimits(decode_pixels=True))


def test_the_huge_png_is_a_real_png():
    data = make_huge_png(300, 200)
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size == (300, 200) and img.getextrema() == ((0, 0),) * 3
    assert zlib.decompress(data[data.index(b"IDAT") + 4:-16]) == bytes(200 * (1 + 900))


# -- end to end: a real adapter against its fake --------------------------------------------------------
def together_then_mock(fake_url: str, with_fallback: bool) -> Policy:
    deny = builtin_providers("together")
    return Policy.model_validate({
        "name": "t", "deny": deny, "objective": "ordered",
        "prefer": [TOGETHER, "mock/backup"] if with_fallback else [TOGETHER],
        "offerings": [mock_offering("backup", capabilities={"default_size": "1024x1024"})]
        if with_fallback else [],
        "providers": {"together": {"base_url": fake_url}},
        "retry": {"max_attempts": 2, "initial_delay_s": 0.01},
        "fallback": {"max_offerings": 2 if with_fallback else 1}})


@pytest.mark.parametrize("step, why", [("tiny", "is 8x8, not the 1024x1024 asked"),
                                       ("junk", "byte(s) after its IEND chunk"),
                                       ("gif", "is GIF, not PNG, JPEG or WebP"),
                                       ("huge", "is 13000x13000"),
                                       ("many", "asked for 1 image(s), got 50")])
async def test_a_hostile_answer_falls_back_to_the_next_candidate(step, why, tmp_path, monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", fakes()["together"].key)
    with fakes()["together"]([step]) as fake:
        async with AsyncBroker(together_then_mock(fake.base_url, True),
                               ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            result = await b.generate(prompt="a red circle", size="1024x1024")
    (failed, ok) = result.attempts  # not retried: the same provider would answer the same
    assert (failed.offering, failed.error_type) == (TOGETHER, "BadProviderResponse")
    # it answered, so it billed: what it billed stays in the call's cost, beside the backup's
    assert failed.cost is not None and failed.cost.usd > 0 and "answer refused, billed" in failed.cost.detail
    assert result.offering == "mock/backup" and result.cost.usd == Decimal("0.01") + failed.cost.usd
    assert why in failed.error and "image" in failed.error and ok.error_type is None


async def test_a_hostile_answer_with_no_fallback_is_no_success(tmp_path, monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", fakes()["together"].key)
    with fakes()["together"](["junk", "ok"]) as fake:
        async with AsyncBroker(together_then_mock(fake.base_url, False),
                               ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            with pytest.raises(AllAttemptsFailed) as exc:
                await b.generate(prompt="a red circle", n=2)
    assert [a.error_type for a in exc.value.attempts] == ["BadProviderResponse"]
    assert exc.value.attempts[0].error.endswith(f"image 1 has {len(JUNK)} byte(s) after its IEND chunk")
    assert fake.generations == 1


async def test_the_google_adapter_refuses_fifty_images_for_one(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", fakes()["google"].key)
    with fakes()["google"](["many"]) as fake:
        deny = builtin_providers("google")
        policy = Policy.model_validate({"name": "t", "deny": deny, "prefer": [GOOGLE], "objective": "ordered",
                                        "providers": {"google": {"base_url": fake.base_url}},
                                        "fallback": {"max_offerings": 1}})
        async with AsyncBroker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            with pytest.raises(AllAttemptsFailed) as exc:
                await b.generate(prompt="a red circle")
    assert "asked for 1 image(s), got 50" in exc.value.attempts[0].error


async def test_a_few_extra_images_succeed_with_n_and_the_usage_billed(tmp_path):
    def handler(request, offering, ctx):
        images = [RawImage(make_image(256, 256, seed=s), s) for s in range(3)]
        return ProviderResult(images, {"images": 3}, "r-3", {})

    policy = Policy.model_validate({"name": "t", "deny": builtin_providers(),
                                    "offerings": [mock_offering("x")]})
    async with AsyncBroker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}",
                           providers={"mock": MockProvider.with_handler(handler)}) as b:
        result = await b.generate(prompt="x")
    assert [i.seed for i in result.images] == [0]
    assert result.cost.usd == Decimal("0.03")  # the provider's usage: what it sent, flagged by the caller


async def test_the_policy_sets_the_limits(tmp_path):
    def handler(request, offering, ctx):
        return ProviderResult([RawImage(make_image(256, 256, seed=s), s) for s in range(2)], {"images": 2}, "r", {})

    policy = Policy.model_validate({"name": "t", "deny": builtin_providers(), "offerings": [mock_offering("x")],
                                    "images": {"max_images_factor": 1, "max_images_slack": 0}})
    async with AsyncBroker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}",
                           providers={"mock": MockProvider.with_handler(handler)}) as b:
        with pytest.raises(AllAttemptsFailed, match="more than the 1 accepted in one answer"):
            await b.generate(prompt="x")
