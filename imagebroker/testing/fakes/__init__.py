"""Fake provider servers on 127.0.0.1 that speak each provider's protocol and can be scripted to fail.

Every fake takes a `script`: one step per *generation* request (polls and downloads do not count),
the last step repeating. Steps every fake understands:

    ok         the happy path
    429        rate limited, with Retry-After: 1
    500        a server error
    timeout    hangs for 30 s
    malformed  200 with a body that is not JSON
    badkey     the provider's answer to a wrong key
    empty      success with zero images
    broken     success with bytes that are not an image
    refuse     the provider's moderation refusal

Hostile steps, for fakes whose images come from `FakeServer.images` (all but OpenAI's and ComfyUI's):

    tiny       success with 8x8 images, whatever size was asked
    junk       success with valid images followed by 64 KiB of junk
    gif        success with GIF bytes (served under the protocol's usual image label)
    huge       success with PNGs whose header claims 13000x13000 (500 KB on the wire, 676 MB decoded)
    many       success with 50 images, whatever n was asked (where one answer carries every image:
               Together, Google, fakehttp; the others fetch one URL per image asked)

OpenAI's fake also takes `c2pa`: success with images that carry a C2PA manifest store (a PNG caBX
chunk, a JPEG APP11 segment), as OpenAI's own do.

    with FAKES["bfl"](script=["429", "ok"]) as server:   # server.url, server.requests
        ...
"""

from __future__ import annotations

from typing import Any

from .base import GENERIC, JUNK, FakeServer, Reply

__all__ = ["GENERIC", "JUNK", "FakeServer", "Reply", "fakes"]


def fakes() -> dict[str, type[Any]]:
    """Every fake server, by provider name."""
    from .azure import FakeAzure
    from .bfl import FakeBFL
    from .byteplus import FakeBytePlus
    from .dashscope import FakeDashScope
    from .fal import FakeFal
    from .google import FakeGoogle
    from .ideogram import FakeIdeogram
    from .luma import FakeLuma
    from .openai import FakeOpenAI
    from .recraft import FakeRecraft
    from .replicate import FakeReplicate
    from .runway import FakeRunway
    from .stability import FakeStability
    from .together import FakeTogether
    from .xai import FakeXAI

    found: dict[str, type[Any]] = {f.name: f for f in (
        FakeTogether, FakeStability, FakeBFL, FakeFal, FakeOpenAI, FakeGoogle, FakeReplicate, FakeXAI,
        FakeRecraft, FakeAzure, FakeBytePlus, FakeIdeogram, FakeDashScope, FakeRunway, FakeLuma)}
    try:
        from .comfyui import FakeComfyUI
    except ImportError:  # the ComfyUI fake needs aiohttp (the [dev] or [comfyui] extra)
        return found
    found[FakeComfyUI.name] = FakeComfyUI
    return found
