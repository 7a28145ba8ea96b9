"""The eight providers added for breadth (xAI, Recraft, Azure OpenAI, BytePlus, Ideogram, DashScope, Runway,
Luma) and Google's Imagen, end to end against their fakes: what goes on the wire in each protocol's own
terms, and each call's cost worked by hand from the provider's published formula. The conformance suite
covers the failure steps every provider shares; these are each protocol's own corners."""

from __future__ import annotations

import io
import json
from decimal import Decimal

import pytest
from PIL import Image

from imagebroker import Broker
from imagebroker.errors import AllAttemptsFailed, ContentRejected
from imagebroker.policies.effective import effective_catalog
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.providers.registry import provider_class
from imagebroker.testing.fakes import fakes
from imagebroker.testing.fakes.base import multipart, seen_image
from tests.conftest import left_half_mask, png

FAKES = fakes()


def call(provider: str, tmp_path, monkeypatch, *, script=("ok",), settings=None, policy=None, **request):
    """One call through the broker to the provider's fake: (result or error, fake, broker's plan)."""
    if provider_class(provider).api_key_env:
        monkeypatch.setenv(provider_class(provider).api_key_env, FAKES[provider].key)
    fake = FAKES[provider](list(script))
    with fake:
        pol = Policy.model_validate({
            "name": "new-providers", "deny": [p for p in builtin_catalog().providers() if p != provider],
            "providers": {provider: {"base_url": fake.base_url, "poll_interval_s": 0.02, **(settings or {})}},
            "retry": {"max_attempts": 2, "initial_delay_s": 0.01}, **(policy or {})})
        with Broker(pol, ledger=f"sqlite:///{tmp_path / 'l.db'}", store=False) as b:
            try:
                return b.generate(request.pop("prompt", "a lighthouse at dusk"), **request), fake
            except (AllAttemptsFailed, ContentRejected) as exc:
                return exc, fake


def bodies(fake, path_part: str) -> list[dict]:
    return [json.loads(r["body"]) for r in fake.requests if r["method"] == "POST" and path_part in r["path"]]


# -- xAI ---------------------------------------------------------------------------------------------------
def test_xai_asks_an_aspect_ratio_never_a_size_and_is_settled_at_the_charge_it_reports(tmp_path, monkeypatch):
    result, fake = call("xai", tmp_path, monkeypatch, model="xai/grok-imagine-image", n=2, aspect_ratio="16:9")
    body = bodies(fake, "/images/generations")[0]
    assert "size" not in body and (body["aspect_ratio"], body["resolution"]) == ("16:9", "1k")
    assert [(i.width, i.height) for i in result.images] == [(1408, 768)] * 2
    # $0.02 per image (docs.x.ai): 2 x 200,000,000 ticks at 10^10 ticks per dollar = $0.04, as billed
    assert result.cost.status == "priced" and result.cost.usd == Decimal("0.04")
    assert result.cost.detail == "$0.04 as billed by the provider"
    assert result.plan.candidates[0].estimated_cost.usd == Decimal("0.04")


def test_xai_edits_go_as_json_data_uris_and_a_moderation_refusal_keeps_its_charge(tmp_path, monkeypatch):
    init = png((1024, 768))
    result, fake = call("xai", tmp_path, monkeypatch, model="xai/grok-imagine-image", images=[init])
    sent = fake.state["edits"][0]
    assert sent["inputs"][0].sha256 == seen_image(init).sha256 and "image" in sent["body"]
    assert (result.images[0].width, result.images[0].height) == (1280, 896)   # follows the input's 4:3
    assert result.cost.usd == Decimal("0.022")   # $0.02 output + the fake's $0.002 input, as billed

    refused, _ = call("xai", tmp_path, monkeypatch, script=["refuse"], model="xai/grok-imagine-image")
    assert isinstance(refused, ContentRejected)
    cost = refused.attempts[0].cost
    assert cost is not None and cost.usd == Decimal("0.02") and "as billed" in cost.detail


# -- Recraft -----------------------------------------------------------------------------------------------
def test_recraft_settles_from_the_credits_its_answer_reports(tmp_path, monkeypatch):
    result, fake = call("recraft", tmp_path, monkeypatch, model="recraft/recraftv4_1", n=2, seed=7,
                        size="1344x768")
    body = bodies(fake, "/images/generations")[0]
    assert body["size"] == "1344x768" and body["random_seed"] == 7 and body["response_format"] == "b64_json"
    # V4.1: 35 API units an image, 1,000 units to the dollar: 2 x 35 = 70 units = $0.07
    assert result.cost.units["credits"] == 70 and result.cost.usd == Decimal("0.07")


def test_recraft_edits_are_image_to_image_with_a_strength_or_inpaint_with_a_mask(tmp_path, monkeypatch):
    init = png((1024, 1024))
    result, fake = call("recraft", tmp_path, monkeypatch, model="recraft/recraftv3", images=[init], strength=0.3)
    sent = fake.state["edits"][0]
    assert sent["path"] == "/v1/images/imageToImage" and sent["body"]["strength"] == "0.3"
    assert sent["input"].sha256 == seen_image(init).sha256 and result.cost.usd == Decimal("0.04")

    result, fake = call("recraft", tmp_path, monkeypatch, model="recraft/recraftv3", images=[init],
                        mask=left_half_mask((1024, 1024)))
    assert fake.state["edits"][0]["path"] == "/v1/images/inpaint" and "strength" not in fake.state["edits"][0]["body"]
    plan_v4 = builtin_catalog().resolve("recraft/recraftv4_1").capabilities.edit
    assert plan_v4 is not None and not plan_v4.mask   # inpaint is V3 only


# -- Azure OpenAI ------------------------------------------------------------------------------------------
def test_azure_calls_the_deployment_with_api_key_and_prices_the_tokens_it_reports(tmp_path, monkeypatch):
    result, fake = call("azure", tmp_path, monkeypatch, model="azure/gpt-image-1.5", quality="medium",
                        settings={"options": {"deployments": {"gpt-image-1.5": "images-eu"}},
                                  "region": "swedencentral"},
                        policy={"constraints": {"regions": ["eu"]}})
    request = next(r for r in fake.requests if r["method"] == "POST")
    assert request["path"] == "/openai/deployments/images-eu/images/generations"
    assert request["query"]["api-version"] == ["2025-04-01-preview"]
    assert request["headers"]["api-key"] == FAKES["azure"].key and "authorization" not in request["headers"]
    # 12 text tokens at $5/M + 1,056 image-output tokens (medium, 1024x1024) at $32/M
    assert result.cost.usd == (12 * Decimal("0.000005") + 1056 * Decimal("0.000032")).normalize()
    assert result.offering == "azure/gpt-image-1.5"   # planned under `regions: [eu]`: the resource's region


def test_azure_without_a_region_processes_anywhere_so_eu_residency_rejects_it(monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "k")
    pol = Policy.model_validate({"name": "az", "constraints": {"regions": ["eu"]},
                                 "providers": {"azure": {"options": {"resource": "contoso"}}}})
    with Broker(pol, ledger=None, store=False) as b:
        plan = b.plan("a cat", model="azure/gpt-image-1.5")
    assert not plan.candidates and any("global" in r for rej in plan.rejected for r in rej.reasons)


def test_azure_without_a_resource_is_unavailable_naming_the_setting(monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "k")
    pol = Policy.model_validate({"name": "az", "deny": [p for p in builtin_catalog().providers() if p != "azure"]})
    with Broker(pol, ledger=None, store=False) as b:
        plan = b.plan("a cat", model="azure/gpt-image-1.5")
    assert not plan.candidates
    assert any("providers.azure.options.resource" in r for rej in plan.rejected for r in rej.reasons)


# -- BytePlus ----------------------------------------------------------------------------------------------
def test_byteplus_asks_one_image_a_call_without_a_watermark_and_splits_n(tmp_path, monkeypatch):
    result, fake = call("byteplus", tmp_path, monkeypatch, model="byteplus/seedream-4-5-251128", n=3)
    sent = bodies(fake, "/images/generations")
    assert len(sent) == 3 and all("n" not in b and b["watermark"] is False for b in sent)
    assert fake.state["watermarks"] == [False] * 3 and all(b["size"] == "2048x2048" for b in sent)
    assert len(result.images) == 3 and result.cost.usd == Decimal("0.12")   # 3 x $0.04


def test_byteplus_keeps_the_images_of_a_group_whose_other_image_failed(tmp_path, monkeypatch):
    result, _ = call("byteplus", tmp_path, monkeypatch, script=["partial"], model="byteplus/seedream-4-0-250828",
                     extra={"byteplus": {"sequential_image_generation": "auto"}})
    assert len(result.images) == 1 and result.cost.units["images"] == 1 and result.cost.usd == Decimal("0.03")


# -- Ideogram ----------------------------------------------------------------------------------------------
def test_ideogram_sends_a_multipart_form_with_its_speed_and_resolution(tmp_path, monkeypatch):
    result, fake = call("ideogram", tmp_path, monkeypatch, model="ideogram/ideogram-v3-quality", n=2, seed=5,
                        aspect_ratio="16:9")
    request = next(r for r in fake.requests if r["method"] == "POST")
    form = {p.name: p.text for p in multipart(request)}
    assert request["path"] == "/v1/ideogram-v3/generate" and request["headers"]["api-key"] == FAKES["ideogram"].key
    assert form["rendering_speed"] == "QUALITY" and form["resolution"] == "1344x768" and form["num_images"] == "2"
    assert [i.seed for i in result.images] == [5, 6]
    assert result.cost.usd == Decimal("0.18")   # 2 x $0.09 (QUALITY)


def test_ideogram_an_image_its_safety_check_refused_is_a_refusal_counted_in_full(tmp_path, monkeypatch):
    refused, _ = call("ideogram", tmp_path, monkeypatch, script=["unsafe_one"], model="ideogram/ideogram-v3", n=2)
    assert isinstance(refused, ContentRejected) and "refused 1 of 2" in str(refused)
    cost = refused.attempts[0].cost   # whether refused images are billed is not documented: never under-count
    assert cost is not None and cost.units["images"] == 2 and cost.usd == Decimal("0.12")


def test_ideogram_edit_sends_the_mask_inverted_black_where_to_change(tmp_path, monkeypatch):
    init = png((1024, 1024))
    result, fake = call("ideogram", tmp_path, monkeypatch, model="ideogram/ideogram-v3-edit", images=[init],
                        mask=left_half_mask((1024, 1024)))
    sent = fake.state["edits"][0]
    mask = Image.open(io.BytesIO(sent["mask"]))
    assert sent["route"] == "edit" and mask.getpixel((10, 10)) == 0 and mask.getpixel((1000, 10)) == 255
    assert result.cost.usd == Decimal("0.06")


# -- DashScope ---------------------------------------------------------------------------------------------
def test_dashscope_wan_runs_as_a_task_with_star_sizes_and_always_sends_n(tmp_path, monkeypatch):
    result, fake = call("dashscope", tmp_path, monkeypatch, model="dashscope/wan2.2-t2i-flash", n=3,
                        size="1280x720")
    post = next(r for r in fake.requests if r["method"] == "POST")
    body = json.loads(post["body"])
    assert post["headers"]["x-dashscope-async"] == "enable"
    assert body["parameters"]["size"] == "1280*720" and body["parameters"]["n"] == 3
    assert all("x-dashscope-async" not in r["headers"] for r in fake.requests if r["method"] == "GET")
    assert len(result.images) == 3 and result.cost.usd == Decimal("0.075")   # 3 x $0.025 (Singapore)


def test_dashscope_bills_only_the_results_a_partly_failed_task_made(tmp_path, monkeypatch):
    failed, _ = call("dashscope", tmp_path, monkeypatch, script=["partial"], model="dashscope/wan2.2-t2i-plus", n=2)
    assert isinstance(failed, AllAttemptsFailed)   # 1 of 2 images is not what was asked: an answer refused
    assert [a.error_type for a in failed.attempts] == ["BadProviderResponse"]
    cost = failed.attempts[0].cost   # and it keeps what it billed: the one image made
    assert cost is not None and cost.usd == Decimal("0.05") and "billed" in cost.detail


def test_dashscope_qwen_image_is_one_synchronous_call(tmp_path, monkeypatch):
    result, fake = call("dashscope", tmp_path, monkeypatch, model="dashscope/qwen-image-plus")
    assert [r["path"] for r in fake.requests if r["method"] == "POST"] == [
        "/api/v1/services/aigc/multimodal-generation/generation"]
    assert (result.images[0].width, result.images[0].height) == (1328, 1328) and result.cost.usd == Decimal("0.035")


@pytest.mark.parametrize("region, host", [("cn", "https://dashscope.aliyuncs.com/api/v1"),
                                          ("us", "https://dashscope-us.aliyuncs.com/api/v1")])
def test_dashscope_region_is_its_host(region, host):
    policy = Policy.model_validate({"name": region, "providers": {"dashscope": {"region": region}}})
    offering = effective_catalog(policy, builtin_catalog()).resolve("dashscope/wan2.2-t2i-flash")
    provider = provider_class("dashscope")(policy.provider("dashscope"))
    assert provider.base_url_for(offering) == host and offering.regions == (region,)


# -- Runway ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, usd", [("1280x720", "0.05"), ("1920x1080", "0.08")])
def test_runway_asks_its_ratio_in_pixels_and_prices_720p_and_1080p_apart(tmp_path, monkeypatch, size, usd):
    result, fake = call("runway", tmp_path, monkeypatch, model="runway/gen4_image", size=size, seed=3)
    body = bodies(fake, "/v1/text_to_image")[0]
    assert body["ratio"] == size.replace("x", ":") and body["seed"] == 3
    assert all(r["headers"].get("x-runway-version") == "2024-11-06" for r in fake.requests
               if not r["path"].startswith("/files/"))
    assert result.cost.usd == Decimal(usd)   # 5 credits at 720p, 8 at 1080p, $0.01 a credit


def test_runway_turbo_needs_a_reference_image(tmp_path, monkeypatch):
    pol = Policy.model_validate({"name": "rw"})
    with Broker(pol, ledger=None, store=False) as b:
        plan = b.plan("a cat", model="runway/gen4_image_turbo")
    assert not plan.candidates and any("needs an input image" in r for rej in plan.rejected for r in rej.reasons)
    result, fake = call("runway", tmp_path, monkeypatch, model="runway/gen4_image_turbo", images=[png((720, 720))],
                        size="720x720")
    assert len(fake.state["edits"][0]["inputs"]) == 1 and result.cost.usd == Decimal("0.02")


# -- Luma --------------------------------------------------------------------------------------------------
def test_luma_polls_a_generation_sized_by_aspect_ratio(tmp_path, monkeypatch):
    result, fake = call("luma", tmp_path, monkeypatch, model="luma/photon-1", aspect_ratio="16:9")
    assert bodies(fake, "/generations/image")[0]["aspect_ratio"] == "16:9"
    assert (result.images[0].width, result.images[0].height) == (2048, 1152)
    assert result.applied["served_by"] == "photon-v1.0" and result.cost.usd == Decimal("0.0073")


def test_luma_moderation_after_submission_is_a_refusal_recorded_as_refunded(tmp_path, monkeypatch):
    refused, _ = call("luma", tmp_path, monkeypatch, script=["refuse"], model="luma/photon-1")
    assert isinstance(refused, ContentRejected) and "moderation" in str(refused)
    cost = refused.attempts[0].cost
    assert cost is not None and cost.usd == 0 and cost.units["images"] == 0   # Luma refunds failed generations


# -- Google Imagen -----------------------------------------------------------------------------------------
def test_imagen_is_shut_down_and_says_so():
    with Broker(Policy.model_validate({"name": "g"}), ledger=None, store=False) as b:
        plan = b.plan("a cat", model="google/imagen-4.0-generate-001")
    assert not plan.candidates
    assert any("shut" in r for rej in plan.rejected for r in rej.reasons)


def test_imagen_predict_where_a_policy_still_routes_to_it(tmp_path, monkeypatch):
    revived = [{"id": "google/imagen-4.0-generate-001", "status": "current", "shutdown": None}]
    result, fake = call("google", tmp_path, monkeypatch, model="google/imagen-4.0-generate-001", n=3,
                        aspect_ratio="9:16", seed=4, policy={"offerings": revived})
    request = next(r for r in fake.requests if r["method"] == "POST")
    body = json.loads(request["body"])
    assert request["path"] == "/v1beta/models/imagen-4.0-generate-001:predict"
    assert body["parameters"]["sampleCount"] == 3 and body["parameters"]["aspectRatio"] == "9:16"
    assert "seed" not in body["parameters"]   # Vertex only: reported dropped, never sent
    assert "seed" in result.plan.candidates[0].dropped
    assert [(i.width, i.height) for i in result.images] == [(768, 1408)] * 3
    assert result.cost.usd == Decimal("0.12")   # 3 x $0.04


# -- hostile answers: every new fake can lie about its images, and each lie is caught --------------------------
NEW = {"xai": "xai/grok-imagine-image", "recraft": "recraft/recraftv4_1", "azure": "azure/gpt-image-1.5",
       "byteplus": "byteplus/seedream-4-0-250828", "ideogram": "ideogram/ideogram-v3",
       "dashscope": "dashscope/wan2.2-t2i-flash", "runway": "runway/gen4_image", "luma": "luma/photon-1"}


@pytest.mark.parametrize("provider", sorted(NEW))
@pytest.mark.parametrize("step", ["tiny", "huge"])
def test_an_image_that_is_not_what_was_asked_is_refused_and_kept_billed(tmp_path, monkeypatch, provider, step):
    failed, _ = call(provider, tmp_path, monkeypatch, script=[step], model=NEW[provider])
    assert isinstance(failed, AllAttemptsFailed)
    assert [a.error_type for a in failed.attempts] == ["BadProviderResponse"]
    assert failed.attempts[0].cost is not None and failed.attempts[0].cost.usd > 0   # paid for: recorded
