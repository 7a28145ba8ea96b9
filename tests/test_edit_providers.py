"""Edits end to end against every provider's fake server: the input images, the mask and the edit fields
as the real API takes them (multipart parts, base64 fields, data URIs, uploads), the mask converted to the
provider's convention, and the settled cost equal to the published formula including the input images."""

from __future__ import annotations

import io
from decimal import Decimal

from PIL import Image

from imagebroker import Broker
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.providers.registry import provider_class
from imagebroker.testing.fakes import fakes
from imagebroker.testing.fakes.base import seen_image

FAKES = fakes()


def png(size: tuple[int, int], colour: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def left_half_mask(size: tuple[int, int]) -> bytes:
    """White (change) on the left half, black (keep) on the right: imagebroker's convention."""
    image = Image.new("L", size, 0)
    image.paste(255, (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def edit(provider: str, offering: str, tmp_path, monkeypatch, *, script=("ok",), policy_extra=None,
         setup=None, **request):
    """One edit through the broker against the provider's fake: (result or error, fake)."""
    if provider_class(provider).api_key_env:
        monkeypatch.setenv(provider_class(provider).api_key_env, FAKES[provider].key)
    fake = FAKES[provider](list(script))
    with fake:
        policy = Policy.model_validate({
            "name": "edits", "deny": [p for p in builtin_catalog().providers() if p != provider],
            "providers": {provider: {"base_url": fake.base_url, "poll_interval_s": 0.02, **(setup or {})}},
            "retry": {"max_attempts": 2, "initial_delay_s": 0.01}, **(policy_extra or {})})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}", store=False) as b:
            return b.generate("make the background green", model=offering, **request), fake


# -- OpenAI: images.edit through the SDK -----------------------------------------------------------
def test_openai_edit_sends_image_parts_and_an_alpha_mask_and_bills_input_tokens(tmp_path, monkeypatch):
    init, ref = png((1024, 1024)), png((512, 768), (0, 0, 200))
    result, fake = edit("openai", "openai/gpt-image-2", tmp_path, monkeypatch, images=[init, ref],
                        mask=left_half_mask((1024, 1024)), quality="low", n=2)
    sent = fake.state["edits"][0]
    names = [(name, filename, ctype) for name, filename, ctype in sent["parts"] if filename]
    assert names == [("image[]", "image-0.png", "image/png"), ("image[]", "image-1.png", "image/png"),
                     ("mask", "mask.png", "image/png")]
    assert [i.sha256 for i in sent["images"]] == [seen_image(init).sha256, seen_image(ref).sha256]
    assert sent["fields"]["model"] == "gpt-image-2" and sent["fields"]["n"] == 2
    assert sent["fields"]["size"] == "1024x1024" and "moderation" not in sent["fields"]
    mask = Image.open(io.BytesIO(sent["mask"]))
    assert mask.mode == "RGBA" and mask.getpixel((10, 10))[3] == 0 and mask.getpixel((1000, 10))[3] == 255
    # settled from usage: text + input-image + output-image tokens at the catalog's rates
    usage = result.cost.units
    image_in = 32 * 32 + 16 * 24          # 32 px patches of 1024x1024 and 512x768
    assert usage["input_image_tokens"] == image_in
    expected = (Decimal(usage["input_text_tokens"]) * Decimal("0.000005") + image_in * Decimal("0.000008")
                + Decimal(usage["output_image_tokens"]) * Decimal("0.000030"))
    assert result.cost.status == "priced" and result.cost.usd == expected.normalize()
    # the estimate counted the input images too, so the plan did not under-reserve
    cand = result.plan.candidates[0]
    assert cand.estimated_cost.units["input_image_tokens"] == 2 * 1024 and cand.bound_usd >= result.cost.usd
    assert [img.size for img in map(lambda i: Image.open(io.BytesIO(i.data)), result.images)] == [(1024, 1024)] * 2


def test_openai_edit_without_a_size_keeps_the_init_images_size(tmp_path, monkeypatch):
    result, fake = edit("openai", "openai/gpt-image-2", tmp_path, monkeypatch, images=[png((1536, 1024))])
    assert fake.state["edits"][0]["fields"]["size"] == "1536x1024"
    assert (result.images[0].width, result.images[0].height) == (1536, 1024)
