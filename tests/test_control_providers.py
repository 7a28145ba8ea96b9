"""Structural control and image prompts against each hosted provider's fake, with the fields its real API
takes (research for issue 15, 2026-12-03): BFL's FLUX.1 Canny/Depth [pro], fal's flux-general
(`controlnet_unions`, `ip_adapters`), Replicate's FLUX Canny/Depth (`control_image`, the source image),
Stability's control/sketch, control/structure and control/style, and a ComfyUI workflow's ControlNet nodes;
the settled cost equal to the catalog's price, and what each one cannot honour said in the plan."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from imagebroker import Broker
from imagebroker.control import canny
from imagebroker.inputs import read_input
from imagebroker.policies.loader import load_policy
from imagebroker.providers.registry import provider_class
from imagebroker.testing.fakes.base import seen_image
from tests.conftest import png
from tests.test_edit_providers import comfy, edit


# -- BFL ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["canny", "depth"])
def test_bfl_control_endpoints_take_our_control_image_as_preprocessed_and_its_size(tmp_path, monkeypatch, kind):
    """FLUX.1 Canny/Depth [pro]: the control image as `preprocessed_image` (BFL's `control_image` would run
    its own preprocessing), no width/height (the output takes the control image's size), 5 credits."""
    image = canny(read_input(png((512, 384)))) if kind == "canny" else png((512, 384))
    result, fake = edit("bfl", f"bfl/flux-pro-1.0-{kind}", tmp_path, monkeypatch, seed=4,
                        control=[{"kind": kind, "image": image}])
    sent = fake.state["edits"][0]
    assert sent["path"] == f"/v1/flux-pro-1.0-{kind}"
    assert "width" not in sent["body"] and "control_image" not in sent["body"] and sent["body"]["seed"] == 4
    assert (sent["inputs"]["preprocessed_image"].width, sent["inputs"]["preprocessed_image"].height) == (512, 384)
    assert (result.images[0].width, result.images[0].height) == (512, 384)
    assert result.cost.usd == Decimal("0.05") and result.applied["control"][0]["kind"] == kind


def test_what_was_not_sent_is_marked_dropped_in_applied(tmp_path, monkeypatch):
    result, _ = edit("bfl", "bfl/flux-pro-1.0-canny", tmp_path, monkeypatch,
                     control=[{"kind": "canny", "image": png((512, 512)), "scale": 0.5}])
    assert result.dropped == ("control scale",)
    assert result.applied["control"][0]["dropped"] == ["scale"]   # BFL has no strength field


def test_a_control_endpoint_is_never_planned_without_a_control_image():
    with Broker(load_policy("local-first")) as b:
        plan = b.plan("a cat", size="1024x1024")
    reasons = {r.offering: r.reasons for r in plan.rejected}
    assert "needs a control image (canny)" in reasons["bfl/flux-pro-1.0-canny"]
    assert "needs an image prompt (a style reference)" in reasons["stability/control-style"]
    assert all(c.offering != "bfl/flux-pro-1.0-depth" for c in plan.candidates)


def test_what_an_endpoint_cannot_honour_is_named_in_the_plan(monkeypatch):
    for provider in ("bfl", "fal", "stability", "replicate"):
        monkeypatch.setenv(provider_class(provider).api_key_env, "k")
    control = [{"kind": "canny", "image": png((512, 512)), "scale": 0.6, "start": 0.2}]
    with Broker(load_policy("local-first")) as b:
        plan = b.plan("a cat", control=control)
        strong = b.plan("a cat", control=[{**control[0], "scale": 1.5}])
    dropped = {c.offering: c.dropped for c in plan.candidates}
    assert {"control scale", "control start/end"} <= set(dropped["bfl/flux-pro-1.0-canny"])   # no such fields
    assert dropped["fal/fal-ai/flux-general"] == ()   # conditioning_scale, start/end_percentage
    assert dropped["stability/control-structure"] == ("control start/end",)   # control_strength only
    reasons = {r.offering: r.reasons for r in strong.rejected}
    assert "control scale 1.5 above its max of 1" in reasons["stability/control-structure"]


# -- fal ---------------------------------------------------------------------------------------------------
def test_fal_flux_general_sends_a_union_controlnet_and_an_ip_adapter(tmp_path, monkeypatch):
    edges, ref = canny(read_input(png((512, 512)))), png((256, 256), (200, 0, 0))
    result, fake = edit("fal", "fal/fal-ai/flux-general", tmp_path, monkeypatch, size="1024x768", seed=2,
                        control=[{"kind": "depth", "image": edges, "scale": 0.7, "start": 0.1, "end": 0.8}],
                        image_prompts=[{"image": ref, "scale": 0.5}])
    seen, = fake.state["controls"]
    c, = seen["controls"]
    assert (c["path"], c["control_mode"], c["conditioning_scale"]) == (
        "InstantX/FLUX.1-dev-Controlnet-Union", "depth", 0.7)
    assert (c["start_percentage"], c["end_percentage"]) == (0.1, 0.8)
    assert c["control_image_url"].sha256 == edges.sha256   # the control image itself, as a data: URI
    a, = seen["ip_adapters"]
    assert (a["path"], a["scale"], a["image_encoder_path"]) == ("XLabs-AI/flux-ip-adapter", 0.5,
                                                               "openai/clip-vit-large-patch14")
    assert a["image_url"].sha256 == seen_image(ref).sha256
    assert result.cost.usd == Decimal("0.075")   # 0.79 MP rounded up to 1 MP at $0.075
    shown = json.dumps(result.applied)
    assert "data:image" not in shown and "<data: URI" in shown   # what was sent, never the image bytes
    assert result.applied["image_prompts"][0]["scale"] == 0.5


def test_fal_flux_general_refuses_two_controlnets_as_its_schema_does():
    with Broker(load_policy("local-first")) as b:
        plan = b.plan("a cat", control=[{"kind": "canny", "image": png((64, 64))},
                                        {"kind": "depth", "image": png((64, 64))}])
    reasons = {r.offering: r.reasons for r in plan.rejected}
    assert "2 controls above its max of 1" in reasons["fal/fal-ai/flux-general"]


# -- Replicate ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "usd"), [("flux-canny-pro", "0.05"), ("flux-canny-dev", "0.025")])
def test_replicate_flux_canny_gets_the_source_image_it_preprocesses_itself(tmp_path, monkeypatch, model, usd):
    source = png((640, 448), (10, 120, 10))
    result, fake = edit("replicate", f"replicate/black-forest-labs/{model}", tmp_path, monkeypatch, seed=8,
                        control=[{"kind": "canny", "image": source, "preprocess": True}])
    sent = fake.state["edits"][0]
    assert sent["inputs"]["control_image"].sha256 == seen_image(source).sha256   # the source, not our edges
    assert "width" not in sent["input"] and "aspect_ratio" not in sent["input"]
    if model.endswith("dev"):
        assert sent["input"]["megapixels"] == "match_input"
    assert (result.images[0].width, result.images[0].height) == (640, 448)   # [pro] answers one URL, not a list
    assert result.cost.usd == Decimal(usd)
    assert result.applied["control"][0]["source"]["sha256"] == seen_image(source).sha256


def test_replicate_pro_steps_go_in_its_own_field(tmp_path, monkeypatch):
    _, fake = edit("replicate", "replicate/black-forest-labs/flux-depth-pro", tmp_path, monkeypatch, steps=30,
                   control=[{"kind": "depth", "image": png((512, 512))}])
    sent = fake.state["edits"][0]["input"]
    assert sent["steps"] == 30 and "num_inference_steps" not in sent


# -- Stability ---------------------------------------------------------------------------------------------
def test_stability_control_sketch_sends_the_image_and_control_strength(tmp_path, monkeypatch):
    sketch = png((832, 640), (255, 255, 255))
    result, fake = edit("stability", "stability/control-sketch", tmp_path, monkeypatch, seed=3,
                        control=[{"kind": "sketch", "image": sketch, "scale": 0.4}])
    sent, = fake.state["controls"]
    assert sent["path"] == "/v2beta/stable-image/control/sketch"
    assert sent["fields"]["control_strength"] == "0.4" and "aspect_ratio" not in sent["fields"]
    assert sent["files"]["image"].sha256 == seen_image(sketch).sha256
    assert (result.images[0].width, result.images[0].height) == (832, 640)
    assert result.cost.usd == Decimal("0.03")


def test_stability_control_style_takes_an_image_prompt_as_fidelity(tmp_path, monkeypatch):
    ref = png((300, 300), (0, 0, 250))
    result, fake = edit("stability", "stability/control-style", tmp_path, monkeypatch, size="1344x768",
                        image_prompts=[{"image": ref, "scale": 0.8}])
    sent, = fake.state["controls"]
    assert sent["path"] == "/v2beta/stable-image/control/style"
    assert (sent["fields"]["fidelity"], sent["fields"]["aspect_ratio"]) == ("0.8", "16:9")
    assert sent["files"]["image"].sha256 == seen_image(ref).sha256
    assert (result.images[0].width, result.images[0].height) == (1344, 768)
    assert result.cost.usd == Decimal("0.04")


# -- ComfyUI -----------------------------------------------------------------------------------------------
def control_workflow(tmp_path) -> dict:
    from imagebroker.testing.fakes.comfyui import WORKFLOW_CONTROL

    setup = comfy(tmp_path, WORKFLOW_CONTROL)
    setup["policy_extra"]["offerings"][0]["capabilities"] = {"control": ["canny"]}
    return setup


def test_comfyui_binds_control_to_the_workflows_controlnet_nodes(tmp_path, monkeypatch):
    edges = canny(read_input(png((512, 512))))
    result, fake = edit("comfyui", "comfyui/sdxl", tmp_path, monkeypatch, size="512x512", seed=5,
                        control=[{"kind": "canny", "image": edges, "scale": 0.6, "start": 0.0, "end": 0.7}],
                        **control_workflow(tmp_path))
    graph = json.loads(next(r["body"] for r in fake.requests if r["path"] == "/prompt"))["prompt"]
    name = graph["11"]["inputs"]["image"]
    assert fake.inputs[name] == edges.data   # the control image, uploaded into the input folder
    assert (graph["12"]["inputs"]["strength"], graph["12"]["inputs"]["end_percent"]) == (0.6, 0.7)
    assert result.applied["control"][0]["kind"] == "canny" and result.cost.status == "priced"
    other, _ = edit("comfyui", "comfyui/sdxl", tmp_path, monkeypatch, size="512x512", seed=5,
                    control=[{"kind": "canny", "image": edges, "scale": 0.2}], **control_workflow(tmp_path))
    assert other.images[0].data != result.images[0].data   # the server's sampler saw the control
    _, fake = edit("comfyui", "comfyui/sdxl", tmp_path, monkeypatch, size="512x512", seed=5,
                       **control_workflow(tmp_path))
    graph = json.loads(next(r["body"] for r in fake.requests if r["path"] == "/prompt"))["prompt"]
    assert graph["12"]["inputs"]["strength"] == 0.0   # the workflow's ControlNet holds nothing without a control


def test_comfyui_without_a_controlnet_node_for_the_kind_says_so_before_running(tmp_path, monkeypatch):
    from imagebroker.errors import AllAttemptsFailed

    setup = control_workflow(tmp_path)
    setup["policy_extra"]["offerings"][0]["capabilities"] = {"control": ["canny", "depth"]}
    with pytest.raises(AllAttemptsFailed, match="the workflow has no ControlNet for depth"):
        edit("comfyui", "comfyui/sdxl", tmp_path, monkeypatch, size="512x512",
             control=[{"kind": "depth", "image": png((512, 512))}], **setup)


# -- the hostile answers, on the control endpoints too ------------------------------------------------------
CONTROL_OFFERINGS = [("bfl", "bfl/flux-pro-1.0-canny", "canny"), ("fal", "fal/fal-ai/flux-general", "canny"),
                     ("replicate", "replicate/black-forest-labs/flux-canny-pro", "canny"),
                     ("stability", "stability/control-sketch", "sketch")]


@pytest.mark.parametrize(("provider", "offering", "kind"), CONTROL_OFFERINGS)
@pytest.mark.parametrize(("step", "error", "tries"), [("refuse", "ContentRejected", 1),
                                                      ("empty", "BadProviderResponse", 1),
                                                      ("500", "ProviderUnavailable", 2)])
def test_a_control_call_maps_failures_like_any_other_and_keeps_every_attempt(
        tmp_path, monkeypatch, provider, offering, kind, step, error, tries):
    import sqlite3

    from imagebroker.errors import AllAttemptsFailed, ContentRejected

    with pytest.raises((AllAttemptsFailed, ContentRejected)) as caught:
        edit(provider, offering, tmp_path, monkeypatch, script=[step] * 2,
             control=[{"kind": kind, "image": png((512, 512))}])
    assert isinstance(caught.value, ContentRejected if step == "refuse" else AllAttemptsFailed)
    assert [a.error_type for a in caught.value.attempts] == [error] * tries   # never an empty success
    db = sqlite3.connect(tmp_path / "l.db")
    assert [r[0] for r in db.execute("SELECT error_type FROM attempts ORDER BY number")] == [error] * tries
    (saved,), = db.execute("SELECT request_json FROM calls").fetchall()
    assert json.loads(saved)["control"][0]["kind"] == kind   # the call says what it was asked to follow


def test_a_rule_can_require_offerings_that_follow_control(monkeypatch):
    from imagebroker.policies.schema import Policy

    for provider in ("bfl", "fal", "stability", "replicate"):
        monkeypatch.setenv(provider_class(provider).api_key_env, "k")
    policy = Policy.model_validate({"name": "layouts", "rules": [
        {"name": "layouts", "when": {"tags": {"app": "layouts"}}, "set": {"constraints": {"require_control": True}}},
        {"name": "moodboards", "when": {"tags": {"app": "moods"}},
         "set": {"constraints": {"require_image_prompts": True}}}]})
    with Broker(policy) as b:
        layouts = b.plan("a cat", tags={"app": "layouts"})
        moods = b.plan("a cat", tags={"app": "moods"}, image_prompts=[png((64, 64))])
        free = b.plan("a cat")
    assert layouts.candidates and all(b.catalog.offerings[c.offering].capabilities.control for c in layouts.candidates)
    assert "no ControlNet (policy requires control)" in {r.offering: r.reasons for r in layouts.rejected}[
        "fal/fal-ai/flux/dev"]
    assert {c.offering for c in moods.candidates} == {"fal/fal-ai/flux-general", "stability/control-style"}
    assert "fal/fal-ai/flux/dev" in {c.offering for c in free.candidates}
