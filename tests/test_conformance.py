"""One conformance suite for every provider with a fake server: a new provider gets these tests by
being registered and shipping a fake. No network beyond 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from decimal import Decimal

import pytest
from PIL import Image

from imagebroker import Broker
from imagebroker.errors import AllAttemptsFailed, ContentRejected
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.providers.registry import provider_class
from imagebroker.testing.fakes import fakes

FAKES = fakes()
PROVIDERS = sorted(FAKES)
# the offering each provider is exercised with (priced, current)
OFFERING = {"together": "together/black-forest-labs/FLUX.1-schnell", "stability": "stability/sd3.5-large",
            "bfl": "bfl/flux-2-pro", "fal": "fal/fal-ai/flux/dev", "openai": "openai/gpt-image-2",
            "google": "google/gemini-3.1-flash-image", "replicate": "replicate/black-forest-labs/flux-dev",
            "comfyui": "comfyui/sdxl", "xai": "xai/grok-imagine-image", "recraft": "recraft/recraftv4_1",
            "azure": "azure/gpt-image-1.5", "byteplus": "byteplus/seedream-4-5-251128",
            "ideogram": "ideogram/ideogram-v3", "dashscope": "dashscope/wan2.2-t2i-flash",
            "runway": "runway/gen4_image", "luma": "luma/photon-1"}


def provider_setup(provider: str, tmp_path) -> dict:
    """Policy settings a provider needs beyond its base URL."""
    if provider != "comfyui":
        return {}
    from imagebroker.testing.fakes.comfyui import WORKFLOW

    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(WORKFLOW))
    return {"options": {"workflow": str(workflow)}, "_local": {"gpu_usd_per_hour": "2.50"}}


@pytest.fixture(params=PROVIDERS)
def provider(request):
    return request.param


def run(provider: str, script: list[str], tmp_path, monkeypatch, **policy_extra):
    if set(script) & FAKES[provider].unsupported:
        pytest.skip(f"{provider} has no way to express {sorted(set(script) & FAKES[provider].unsupported)}")
    if provider_class(provider).api_key_env:
        monkeypatch.setenv(provider_class(provider).api_key_env, FAKES[provider].key)
    fake = FAKES[provider](script)
    fake.timeout_s = 3.0
    setup = provider_setup(provider, tmp_path)
    local = setup.pop("_local", {})
    with fake:
        policy = Policy.model_validate({
            "name": "conformance", "deny": [p for p in builtin_catalog().providers() if p != provider],
            "prefer": [OFFERING[provider]], "objective": "ordered", "local": local,
            "providers": {provider: {"base_url": fake.base_url, "poll_interval_s": 0.05, **setup}},
            "retry": {"max_attempts": 2, "initial_delay_s": 0.01}, "fallback": {"max_offerings": 1},
            **policy_extra})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            offering = b.catalog.resolve(OFFERING[provider])
            n = min(2, offering.capabilities.max_n)
            try:
                return b.generate("a red circle", n=n, seed=9), fake, offering
            except (AllAttemptsFailed, ContentRejected) as exc:
                return exc, fake, offering


def test_happy_path(provider, tmp_path, monkeypatch):
    result, _, offering = run(provider, ["ok"], tmp_path, monkeypatch)
    assert not isinstance(result, Exception), result
    w, h = (int(v) for v in offering.capabilities.default_size.split("x"))
    assert len(result.images) == min(2, offering.capabilities.max_n)
    for img in result.images:
        assert Image.open(io.BytesIO(img.data)).size == (w, h) == (img.width, img.height)
    assert result.offering == OFFERING[provider]
    assert result.cost.status == "priced" and result.cost.usd > Decimal(0)
    assert result.cost.units["images"] == len(result.images)
    with sqlite3.connect(tmp_path / "l.db") as conn:
        row = conn.execute("select offering, cost_nusd, cost_status from calls").fetchone()
    assert row == (OFFERING[provider], int(result.cost.usd * 10**9), "priced")


def test_429_with_retry_after_is_retried(provider, tmp_path, monkeypatch):
    result, _, _ = run(provider, ["429", "ok"], tmp_path, monkeypatch)
    assert not isinstance(result, Exception), result
    assert [a.error_type for a in result.attempts] == ["RateLimited", None]
    assert (result.attempts[1].started_at - result.attempts[0].started_at).total_seconds() >= 1.0


@pytest.mark.parametrize("step, error, tries", [
    ("500", "ProviderUnavailable", 2), ("malformed", "BadProviderResponse", 1),
    ("empty", "BadProviderResponse", 1), ("broken", "BadProviderResponse", 1),
    ("refuse", "ContentRejected", 1), ("badkey", "AuthError", 1)])
def test_failures_map_onto_the_error_tree(provider, tmp_path, monkeypatch, step, error, tries):
    result, _, _ = run(provider, [step], tmp_path, monkeypatch)
    # a refusal is the call's answer (no fallback by default); anything else is a failure to serve
    assert isinstance(result, ContentRejected if step == "refuse" else AllAttemptsFailed)
    assert [a.error_type for a in result.attempts] == [error] * tries
    assert not FAKES[provider].key or FAKES[provider].key not in str(result)


def test_a_timeout_after_sending_is_an_unknown_outcome_counted_at_its_estimate(provider, tmp_path, monkeypatch):
    result, fake, _ = run(provider, ["timeout"], tmp_path, monkeypatch, timeout_s=0.5)
    assert isinstance(result, AllAttemptsFailed)
    *before, attempt = result.attempts  # sent, maybe billed: never submitted again
    assert attempt.error_type == "OutcomeUnknown"
    assert all(a.error_type == "ProviderUnavailable" for a in before)  # timed out before sending (the SDK's import)
    # never a second submit (the marker is set as the request goes out: on a slow machine the loop's
    # timeout can fire before the fake has read it, which is still counted as maybe billed)
    assert sum(r.get("method", "POST") == "POST" and "upload" not in r["path"] for r in fake.requests) <= 1
    assert attempt.cost is not None
    if attempt.cost.status == "priced":   # the provider said what the run used (a canvas server's seconds)
        assert "used:" in attempt.cost.detail and attempt.cost.usd > 0
    else:                                 # else counted at its estimate, maybe billed
        assert attempt.cost.status in ("estimated", "unpriced") and "may have been billed" in attempt.cost.detail


# -- edits: every provider takes an init image (and a mask where its edit offering needs one) -------------
EDIT_OFFERING = {"together": "together/black-forest-labs/FLUX.1-kontext-pro", "stability": "stability/inpaint",
                 "bfl": "bfl/flux-2-pro", "fal": "fal/fal-ai/flux/dev/image-to-image",
                 "openai": "openai/gpt-image-2", "google": "google/gemini-3.1-flash-image",
                 "replicate": "replicate/black-forest-labs/flux-fill-pro", "comfyui": "comfyui/sdxl",
                 "xai": "xai/grok-imagine-image", "recraft": "recraft/recraftv3", "azure": "azure/gpt-image-1.5",
                 "byteplus": "byteplus/seedream-4-0-250828", "ideogram": "ideogram/ideogram-v3-edit",
                 "runway": "runway/gen4_image_turbo"}
# no edits: DashScope's Wan and Qwen-Image text-to-image endpoints take no input image here, and Luma's
# reference images must be URLs it fetches itself (no data: URIs)
NO_EDITS = {"dashscope", "luma"}


def run_edit(provider: str, script: list[str], tmp_path, monkeypatch):
    """One edit of a 1024x1024 init image against the provider's fake: (result or error, fake, init bytes)."""
    if provider in NO_EDITS:
        pytest.skip(f"{provider} offers no edits")
    if set(script) & FAKES[provider].unsupported:
        pytest.skip(f"{provider} has no way to express {sorted(set(script) & FAKES[provider].unsupported)}")
    if provider_class(provider).api_key_env:
        monkeypatch.setenv(provider_class(provider).api_key_env, FAKES[provider].key)
    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024), (180, 20, 20)).save(buf, format="PNG")
    init = buf.getvalue()
    mask = Image.new("L", (1024, 1024), 0)
    mask.paste(255, (0, 0, 512, 1024))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    setup, offerings = provider_setup(provider, tmp_path), []
    local = setup.pop("_local", {})
    if provider == "comfyui":
        from imagebroker.testing.fakes.comfyui import WORKFLOW_INPAINT

        (tmp_path / "workflow.json").write_text(json.dumps(WORKFLOW_INPAINT))
        offerings = [{"id": "comfyui/sdxl", "capabilities": {"edit": {"max_images": 1, "mask": True}}}]
    fake = FAKES[provider](script)
    with fake:
        policy = Policy.model_validate({
            "name": "conformance", "deny": [p for p in builtin_catalog().providers() if p != provider],
            "local": local, "offerings": offerings,
            "providers": {provider: {"base_url": fake.base_url, "poll_interval_s": 0.05, **setup}},
            "retry": {"max_attempts": 2, "initial_delay_s": 0.01}, "fallback": {"max_offerings": 1}})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}", store=False) as b:
            offering = b.catalog.resolve(EDIT_OFFERING[provider])
            fields = {"mask": buf.getvalue()} if offering.capabilities.edit.mask else {}
            try:
                return b.generate("make the background green", model=EDIT_OFFERING[provider], images=[init],
                                  seed=9, **fields), fake, init
            except (AllAttemptsFailed, ContentRejected) as exc:
                return exc, fake, init


def carried(request: dict, init: bytes) -> bool:
    """Whether one request to a fake carried the init image: its bytes (multipart, an upload) or base64."""
    body = request.get("body") or b""
    return init in body or base64.b64encode(init) in body or request.get("bytes") == len(init)


def test_edit_happy_path(provider, tmp_path, monkeypatch):
    result, fake, init = run_edit(provider, ["ok"], tmp_path, monkeypatch)
    assert not isinstance(result, Exception), result
    assert result.offering == EDIT_OFFERING[provider] and result.images
    assert result.cost.status == "priced" and result.cost.usd > Decimal(0)
    assert any(carried(r, init) for r in fake.requests)


def test_an_edit_retried_sends_the_same_input_image_again(provider, tmp_path, monkeypatch):
    result, fake, init = run_edit(provider, ["500", "ok"], tmp_path, monkeypatch)
    assert not isinstance(result, Exception), result
    assert [a.error_type for a in result.attempts] == ["ProviderUnavailable", None]
    assert sum(carried(r, init) for r in fake.requests) >= 2


@pytest.mark.parametrize("step, error", [("refuse", ContentRejected), ("broken", AllAttemptsFailed)])
def test_an_edit_fails_as_a_generation_does(provider, tmp_path, monkeypatch, step, error):
    result, _, _ = run_edit(provider, [step], tmp_path, monkeypatch)
    assert isinstance(result, error)
