"""Edits end to end against every provider's fake server: the input images, the mask and the edit fields
as the real API takes them (multipart parts, base64 fields, data URIs, uploads), the mask converted to the
provider's convention, and the settled cost equal to the published formula including the input images."""

from __future__ import annotations

import base64
import io
import json
from decimal import Decimal

import pytest
from PIL import Image

from imagebroker import Broker
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.providers.registry import provider_class
from imagebroker.testing.fakes import fakes
from imagebroker.testing.fakes.base import seen_image
from tests.conftest import left_half_mask, png

FAKES = fakes()


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


# -- Google: inline image parts --------------------------------------------------------------------
def test_google_edit_sends_inline_parts_and_bills_input_image_tokens(tmp_path, monkeypatch):
    a, b = png((1024, 1024)), png((640, 480), (0, 90, 0))
    result, fake = edit("google", "google/gemini-3-pro-image", tmp_path, monkeypatch, images=[a, b])
    sent = fake.requests[-1]
    parts = json.loads(sent["body"])["contents"][0]["parts"]
    assert [list(p) for p in parts] == [["inlineData"], ["inlineData"], ["text"]]
    assert parts[0]["inlineData"]["mimeType"] == "image/png"
    assert base64.b64decode(parts[1]["inlineData"]["data"]) == b
    units = result.cost.units
    assert units["input_image_tokens"] == 2 * 560 and units["input_text_tokens"] == 9
    expected = 9 * Decimal("0.000002") + 1120 * Decimal("0.000002") + units["output_image_tokens"] * Decimal("0.00012")
    assert result.cost.usd == expected.normalize()
    assert result.plan.candidates[0].estimated_cost.units["input_image_tokens"] == 1120


# -- Black Forest Labs: base64 fields ----------------------------------------------------------------
def test_bfl_flux2_edit_sends_references_and_bills_input_megapixels(tmp_path, monkeypatch):
    init, ref = png((1024, 1024)), png((1000, 500), (9, 9, 9))
    result, fake = edit("bfl", "bfl/flux-2-pro", tmp_path, monkeypatch, images=[init, ref])
    body = fake.state["edits"][0]["body"]
    assert base64.b64decode(body["input_image"]) == init and base64.b64decode(body["input_image_2"]) == ref
    assert (body["width"], body["height"]) == (1024, 1024) and "image" not in body and "mask" not in body
    # $0.03 first MP + $0.015/MP further output MP + $0.015 per input MP (docs.bfl.ai)
    out_mp = Decimal(1024 * 1024) / 10**6
    in_mp = Decimal(1024 * 1024 + 1000 * 500) / 10**6
    expected = Decimal("0.03") + (out_mp - 1) * Decimal("0.015") + in_mp * Decimal("0.015")
    assert result.cost.usd == expected.quantize(Decimal("1e-9")).normalize()
    assert "input image(s)" in result.cost.detail
    assert result.plan.candidates[0].estimated_cost.usd == result.cost.usd   # known before the call


def test_bfl_fill_sends_image_and_a_white_mask_and_no_size(tmp_path, monkeypatch):
    init = png((512, 384))
    result, fake = edit("bfl", "bfl/flux-pro-1.0-fill", tmp_path, monkeypatch, images=[init],
                        mask=left_half_mask((512, 384)))
    sent = fake.state["edits"][0]
    assert sent["path"] == "/v1/flux-pro-1.0-fill" and "width" not in sent["body"]
    mask = Image.open(io.BytesIO(base64.b64decode(sent["body"]["mask"])))
    assert mask.mode == "L" and mask.getpixel((10, 10)) == 255 and mask.getpixel((500, 10)) == 0
    assert (result.images[0].width, result.images[0].height) == (512, 384)
    assert result.cost.usd == Decimal("0.05")


def test_bfl_kontext_edit_lets_the_output_take_the_inputs_size(tmp_path, monkeypatch):
    result, fake = edit("bfl", "bfl/flux-kontext-pro", tmp_path, monkeypatch, images=[png((800, 600))])
    body = fake.state["edits"][0]["body"]
    assert fake.state["edits"][0]["path"] == "/v1/flux-kontext-pro" and "width" not in body
    assert (result.images[0].width, result.images[0].height) == (800, 600)
    assert result.cost.usd == Decimal("0.04")


# -- Stability: multipart files ----------------------------------------------------------------------
def test_stability_img2img_uses_sd3_image_to_image_mode(tmp_path, monkeypatch):
    init = png((896, 1152))
    result, fake = edit("stability", "stability/sd3.5-large", tmp_path, monkeypatch, images=[init], strength=0.4)
    sent = fake.state["edits"][0]
    assert sent["path"] == "/v2beta/stable-image/generate/sd3"
    assert sent["fields"]["mode"] == "image-to-image" and sent["fields"]["strength"] == "0.4"
    assert "aspect_ratio" not in sent["fields"] and sent["files"]["image"].sha256 == seen_image(init).sha256
    assert (result.images[0].width, result.images[0].height) == (896, 1152)
    assert result.cost.usd == Decimal("0.065") and result.dropped == ()


def test_stability_inpaint_sends_image_and_white_mask_files(tmp_path, monkeypatch):
    result, fake = edit("stability", "stability/inpaint", tmp_path, monkeypatch, images=[png((640, 640))],
                        mask=left_half_mask((640, 640)), seed=5)
    sent = fake.state["edits"][0]
    assert sent["path"] == "/v2beta/stable-image/edit/inpaint" and sent["fields"]["seed"] == "5"
    assert sent["files"]["mask"].mode == "L" and "mode" not in sent["fields"]
    assert result.cost.usd == Decimal("0.05") and result.cost.units["images"] == 1


# -- fal: queue submissions with data: URIs ------------------------------------------------------------
def test_fal_image_to_image_sends_a_data_uri_and_strength_and_bills_output_megapixels(tmp_path, monkeypatch):
    init = png((1200, 800))
    result, fake = edit("fal", "fal/fal-ai/flux/dev/image-to-image", tmp_path, monkeypatch, images=[init],
                        strength=0.55, n=2)
    sent = fake.state["edits"][0]
    assert sent["path"] == "/fal-ai/flux/dev/image-to-image" and sent["body"]["strength"] == 0.55
    assert sent["body"]["image_url"].startswith("data:image/png;base64,") and "image_size" not in sent["body"]
    assert sent["inputs"]["image_url"].sha256 == seen_image(init).sha256
    # each output image rounded up to whole MP at $0.03: 1200x800 = 0.96 MP -> 1 MP
    assert result.cost.usd == 2 * Decimal("0.03")


def test_fal_fill_sends_image_and_mask_urls(tmp_path, monkeypatch):
    result, fake = edit("fal", "fal/fal-ai/flux-pro/v1/fill", tmp_path, monkeypatch, images=[png((1024, 1024))],
                        mask=left_half_mask((1024, 1024)))
    inputs = fake.state["edits"][0]["inputs"]
    assert inputs["mask_url"].mode == "L" and (inputs["mask_url"].width, inputs["mask_url"].height) == (1024, 1024)
    assert result.cost.usd == 2 * Decimal("0.05")   # 1024x1024 is 1.048576 MP: rounded up to 2 MP


# -- Replicate: file inputs as data: URIs --------------------------------------------------------------
def test_replicate_kontext_sends_input_image_matching_its_aspect_ratio(tmp_path, monkeypatch):
    init = png((832, 1216))
    result, fake = edit("replicate", "replicate/black-forest-labs/flux-kontext-pro", tmp_path, monkeypatch,
                        images=[init])
    sent = fake.state["edits"][0]["input"]
    assert sent["aspect_ratio"] == "match_input_image" and "width" not in sent and "image" not in sent
    assert fake.state["edits"][0]["inputs"]["input_image"].sha256 == seen_image(init).sha256
    assert (result.images[0].width, result.images[0].height) == (832, 1216) and result.cost.usd == Decimal("0.04")


def test_replicate_fill_and_img2img_name_their_inputs_as_the_models_do(tmp_path, monkeypatch):
    result, fake = edit("replicate", "replicate/black-forest-labs/flux-fill-pro", tmp_path, monkeypatch,
                        images=[png((768, 512))], mask=left_half_mask((768, 512)))
    sent = fake.state["edits"][0]
    assert set(sent["inputs"]) == {"image", "mask"} and sent["inputs"]["mask"].mode == "L"
    assert result.cost.usd == Decimal("0.05")
    result, fake = edit("replicate", "replicate/black-forest-labs/flux-dev", tmp_path, monkeypatch,
                        images=[png((1024, 1024))], strength=0.3)
    assert fake.state["edits"][0]["input"]["prompt_strength"] == 0.3
    assert result.cost.usd == Decimal("0.025")


# -- Together: Kontext's image_url -----------------------------------------------------------------------
def test_together_kontext_sends_image_url(tmp_path, monkeypatch):
    init = png((1024, 768))
    result, fake = edit("together", "together/black-forest-labs/FLUX.1-kontext-pro", tmp_path, monkeypatch,
                        images=[init])
    sent = fake.state["edits"][0]
    assert sent["input"].sha256 == seen_image(init).sha256 and sent["body"]["image_url"].startswith("data:image/png")
    assert (sent["body"]["width"], sent["body"]["height"]) == (1024, 768)
    assert result.cost.usd == Decimal("0.04") and result.applied["image_url"] == "<data: URI>"


# -- ComfyUI: uploads bound to LoadImage nodes -----------------------------------------------------------
def comfy(tmp_path, workflow: dict) -> dict:
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    return {"policy_extra": {"local": {"gpu_usd_per_hour": "2.50"},
                             "offerings": [{"id": "comfyui/sdxl", "capabilities": {
                                 "edit": {"max_images": 1, "mask": True, "strength": True}}}]},
            "setup": {"options": {"workflow": str(path)}}}


def test_comfyui_img2img_uploads_the_image_and_binds_load_image_and_denoise(tmp_path, monkeypatch):
    from imagebroker.testing.fakes.comfyui import WORKFLOW_IMG2IMG

    init = png((768, 512))
    result, fake = edit("comfyui", "comfyui/sdxl", tmp_path, monkeypatch, images=[init], strength=0.35, seed=3,
                        **comfy(tmp_path, WORKFLOW_IMG2IMG))
    uploads = [r for r in fake.requests if "upload" in r]
    assert len(uploads) == 1 and fake.inputs[uploads[0]["upload"]] == init
    graph = json.loads(next(r["body"] for r in fake.requests if r["path"] == "/prompt"))["prompt"]
    assert graph["10"]["inputs"]["image"] == uploads[0]["upload"] and graph["3"]["inputs"]["denoise"] == 0.35
    assert (result.images[0].width, result.images[0].height) == (768, 512)
    seconds = Decimal(str(result.cost.units["gpu_seconds"]))   # from the history's timestamps
    assert result.cost.status == "priced" and seconds > 0
    assert result.cost.usd == (seconds * Decimal("2.50") / 3600).quantize(Decimal("1e-9")).normalize()


def test_comfyui_inpaint_binds_the_mask_to_load_image_mask_red_channel(tmp_path, monkeypatch):
    from imagebroker.testing.fakes.comfyui import WORKFLOW_INPAINT

    mask = left_half_mask((512, 512))
    result, fake = edit("comfyui", "comfyui/sdxl", tmp_path, monkeypatch, images=[png((512, 512))], mask=mask,
                        **comfy(tmp_path, WORKFLOW_INPAINT))
    graph = json.loads(next(r["body"] for r in fake.requests if r["path"] == "/prompt"))["prompt"]
    name = graph["12"]["inputs"]["image"]
    assert graph["12"]["inputs"]["channel"] == "red" and name.startswith("mask-")
    uploaded = Image.open(io.BytesIO(fake.inputs[name]))
    assert uploaded.mode == "L" and uploaded.getpixel((5, 5)) == 255 and uploaded.getpixel((500, 5)) == 0
    assert result.applied["seed"] is not None and (result.images[0].width, result.images[0].height) == (512, 512)


def test_comfyui_edit_on_a_text_to_image_workflow_says_which_node_is_missing(tmp_path, monkeypatch):
    from imagebroker.errors import AllAttemptsFailed
    from imagebroker.testing.fakes.comfyui import WORKFLOW

    with pytest.raises(AllAttemptsFailed, match="no node for image"):
        edit("comfyui", "comfyui/sdxl", tmp_path, monkeypatch, images=[png((512, 512))], **comfy(tmp_path, WORKFLOW))
