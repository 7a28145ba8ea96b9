"""Provider behaviour beyond the shared conformance suite."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from imagebroker import Broker
from imagebroker.errors import AllAttemptsFailed, AuthError, ContentRejected, ModelNotFound, RateLimited
from imagebroker.policies.effective import effective_catalog
from imagebroker.policies.loader import load_policy
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.providers.http import status_error
from imagebroker.providers.registry import provider_class
from imagebroker.testing.fakes import fakes
from tests.conftest import builtin_providers

HOSTED = builtin_providers()


@pytest.mark.parametrize("provider, offering, host", [
    ("openai", "openai/gpt-image-2", "https://eu.api.openai.com/v1"),
    ("bfl", "bfl/flux-2-pro", "https://api.eu.bfl.ai"),
])
def test_eu_region_uses_the_regional_host_and_regions(provider, offering, host):
    policy = load_policy("eu-only")
    o = effective_catalog(policy, builtin_catalog()).resolve(offering)
    p = provider_class(provider)(policy.provider(provider))
    assert p.base_url_for(o) == host and o.regions == ("eu",)


@pytest.mark.parametrize("provider, var", [("openai", "OPENAI_API_KEY"), ("google", "GEMINI_API_KEY"),
                                           ("fal", "FAL_KEY"), ("together", "TOGETHER_API_KEY"),
                                           ("stability", "STABILITY_API_KEY"), ("bfl", "BFL_API_KEY")])
def test_a_missing_key_makes_the_offering_unavailable_naming_the_variable(provider, var):
    with Broker("default") as b:
        reasons = {r.offering: r.reasons for r in b.plan("x").rejected}
    assert any(f"no API key: set {var}" in r for o, rs in reasons.items() if o.startswith(provider + "/")
               for r in rs)


def test_a_key_variable_named_in_the_policy_is_used(monkeypatch):
    monkeypatch.setenv("TEAM_BFL_KEY", "k")
    policy = Policy(name="t", providers={"bfl": {"api_key_env": "TEAM_BFL_KEY"}})
    with Broker(policy) as b:
        assert "bfl/flux-2-pro" in [c.offering for c in b.plan("x").candidates]


def test_retired_openai_model_maps_to_model_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", fakes()["openai"].key)
    with fakes()["openai"](["ok"]) as fake:
        policy = Policy.model_validate({
            "name": "t", "deny": [p for p in HOSTED if p != "openai"],
            "providers": {"openai": {"base_url": fake.base_url}},
            # pretend the catalog still thinks gpt-image-1 is current: the API's 404 must be understood
            "offerings": [{"id": "openai/gpt-image-1", "status": "current", "shutdown": None}]})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b, \
                pytest.raises(AllAttemptsFailed) as exc:
            b.generate("x", model="openai/gpt-image-1")
    assert exc.value.attempts[0].error_type == "ModelNotFound" and len(exc.value.attempts) == 1


def test_openai_usage_settles_the_cost_with_the_residency_uplift(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", fakes()["openai"].key)
    with fakes()["openai"](["ok"]) as fake:
        policy = Policy.model_validate({"name": "t", "deny": [p for p in HOSTED if p != "openai"],
                                        "providers": {"openai": {"base_url": fake.base_url, "region": "eu"}}})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            r = b.generate("abcd", model="openai/gpt-image-2", quality="low", size="1024x1024")
    # 1 text token x $5/M + 196 image tokens x $30/M, +10% for the data-residency endpoint
    assert r.cost.usd == (Decimal("0.000005") + Decimal("0.00588")) * Decimal("1.1")
    assert r.cost.status == "priced" and r.cost.units["output_image_tokens"] == 196


def test_openai_sends_the_organization_and_project_as_the_sdk_does(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", fakes()["openai"].key)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-from-env")
    with fakes()["openai"](["ok", "ok"]) as fake:
        policy = {"name": "t", "deny": [p for p in HOSTED if p != "openai"],
                  "providers": {"openai": {"base_url": fake.base_url}}}
        with Broker(Policy.model_validate(policy), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            b.generate("x", model="openai/gpt-image-2")
        policy["providers"]["openai"]["options"] = {"organization": "org-team", "project": "proj_images"}
        with Broker(Policy.model_validate(policy), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            b.generate("x", model="openai/gpt-image-2")
    first, second = (r["headers"] for r in fake.requests)
    assert first["openai-organization"] == "org-from-env" and "openai-project" not in first
    assert (second["openai-organization"], second["openai-project"]) == ("org-team", "proj_images")


@pytest.mark.parametrize("status, body, headers, cls", [
    (429, '{"error": "rate_limit_exceeded", "retry_after": 5}', {}, RateLimited),
    (429, "slow down", {"retry-after-ms": "1500"}, RateLimited),
    (429, '{"error": {"code": "insufficient_quota"}}', {}, AuthError),
    (402, "insufficient credits", {}, AuthError),
    (400, '{"error": {"code": "moderation_blocked"}}', {}, ContentRejected),
    (451, "blocked by safety filter", {}, ContentRejected),
    (404, "not found", {}, ModelNotFound),
    (400, '{"error": {"message": "API key not valid."}}', {}, AuthError),
])
def test_status_mapping(status, body, headers, cls):
    err = status_error(status, body, httpx.Headers({**headers, "x-request-id": "req-9"}), provider="p")
    assert type(err) is cls and err.request_id == "req-9" and err.status == status
    if cls is RateLimited:
        assert err.retry_after in (5.0, 1.5)


def test_google_vertex_eu_uses_the_regional_path_and_a_bearer_token(tmp_path, monkeypatch):
    monkeypatch.setenv("VERTEX_TOKEN", fakes()["google"].key)
    with fakes()["google"](["ok"]) as fake:
        policy = Policy.model_validate({
            "name": "t", "deny": [p for p in HOSTED if p != "google"], "constraints": {"regions": ["eu"]},
            "providers": {"google": {"region": "eu", "base_url": fake.url, "api_key_env": "VERTEX_TOKEN",
                                     "options": {"project": "acme"}}}})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            r = b.generate("x", model="google/gemini-3-pro-image")
        path = fake.requests[0]["path"]
    assert path == "/v1beta1/projects/acme/locations/eu/publishers/google/models/gemini-3-pro-image:generateContent"
    assert fake.requests[0]["headers"]["authorization"] == f"Bearer {fakes()['google'].key}"
    assert r.cost.status == "priced"
