from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from imagebroker.errors import ConfigError
from imagebroker.policies.effective import effective_catalog
from imagebroker.policies.loader import load_policy
from imagebroker.providers.catalog import builtin_catalog, load_catalog_file, stale

TODAY = date(2026, 11, 22)

# Every current offering named in research/providers.md (sections 2-8 and 15).
CURRENT = [
    "openai/gpt-image-2", "openai/gpt-image-2.5-flare", "openai/gpt-image-2.5-sunburst",
    "openai/gpt-image-2.6-flare", "openai/gpt-image-2.6-sunburst", "openai/gpt-image-1.5",
    "openai/gpt-image-1-mini", "google/gemini-3.1-flash-image", "google/gemini-3-pro-image",
    "replicate/black-forest-labs/flux-schnell", "replicate/black-forest-labs/flux-dev",
    "replicate/black-forest-labs/flux-dev-lora", "replicate/black-forest-labs/flux-1.1-pro",
    "replicate/black-forest-labs/flux-pro", "replicate/stability-ai/sdxl", "fal/fal-ai/flux/schnell",
    "fal/fal-ai/flux/dev", "fal/fal-ai/flux-lora", "fal/fal-ai/flux-2/lora", "fal/fal-ai/flux-pro/v1.1",
    "together/black-forest-labs/FLUX.1-schnell", "together/black-forest-labs/FLUX.1-dev",
    "together/black-forest-labs/FLUX.1.1-pro", "stability/stable-image-ultra",
    "stability/stable-image-core", "stability/sd3.5-large", "stability/sd3.5-large-turbo",
    "stability/sd3.5-medium", "bfl/flux-2-pro", "bfl/flux-2-max", "bfl/flux-2-flex",
    "bfl/flux-2-klein-4b", "bfl/flux-2-klein-9b", "bfl/flux-pro-1.1", "bfl/flux-pro-1.1-ultra",
    "bfl/flux-kontext-pro", "bfl/flux-kontext-max", "comfyui/sdxl", "local/tiny-shapes", "local/sdxl",
]
RETIRED = ["openai/gpt-image-1", "openai/dall-e-3", "google/gemini-2.5-flash-image"]


def test_every_current_offering_is_in_the_catalog_and_active():
    active = {o.id for o in builtin_catalog().active(TODAY)}
    assert set(CURRENT) <= active


def test_retired_models_are_kept_for_pricing_history_but_not_planned():
    cat = builtin_catalog()
    active = {o.id for o in cat.active(TODAY)}
    for oid in RETIRED:
        assert cat.resolve(oid) is not None and cat.resolve(oid).price is not None
        assert oid not in active
    # gpt-image-1.5 is deprecated and shuts down on 2026-12-01: plannable today, not after
    o = cat.resolve("openai/gpt-image-1.5")
    assert not o.retired(TODAY) and o.retired(date(2026, 12, 1))


def test_unverified_prices_say_so_in_the_data():
    cat = builtin_catalog()
    lora = cat.resolve("replicate/black-forest-labs/flux-dev-lora").price
    assert lora.confidence == "low" and "not verified" in lora.note.lower()
    sdxl = cat.resolve("replicate/stability-ai/sdxl").price
    assert "not verified" in sdxl.note


def test_every_offering_has_provenance():
    for o in builtin_catalog():
        assert o.source and o.checked and o.regions and o.license.name
        if o.price is not None:
            assert o.price.source and o.price.checked and o.price.confidence


def test_aliases_resolve():
    assert builtin_catalog().resolve("flux-schnell").id == "replicate/black-forest-labs/flux-schnell"


def test_prices_older_than_90_days_are_stale():
    cat = builtin_catalog()
    assert stale(cat.resolve("openai/gpt-image-2"), TODAY)           # checked 2026-04-29
    assert not stale(cat.resolve("fal/fal-ai/flux/dev"), TODAY)      # checked 2026-11-22


def test_policy_overrides_a_price_and_adds_a_private_model(tmp_path: Path):
    p = tmp_path / "p.yaml"
    p.write_text(
        "extends: default\n"
        "offerings:\n"
        "  - id: replicate/black-forest-labs/flux-dev\n"
        "    price: {usd: '0.02', source: 'our contract', checked: 2026-11-01, confidence: high}\n")
    cat = effective_catalog(load_policy(p), builtin_catalog())
    price = cat.resolve("replicate/black-forest-labs/flux-dev").price
    assert price.usd == Decimal("0.02") and price.source == "our contract"
    assert cat.version != builtin_catalog().version  # recomputable: the ledger stores this


def test_region_option_pins_regions_and_uplift():
    cat = effective_catalog(load_policy("eu-only"), builtin_catalog())
    o = cat.resolve("openai/gpt-image-2")
    assert o.regions == ("eu",) and o.price.uplift == Decimal("0.10")
    assert cat.resolve("bfl/flux-2-pro").regions == ("eu",)
    assert cat.resolve("openai/gpt-image-1-mini").regions == ("us",)  # no residency option


def test_bad_catalog_file_names_file_line_and_field(tmp_path: Path):
    f = tmp_path / "x.yaml"
    f.write_text("provider: x\ncatalog_version: 1\nofferings:\n  - model: m\n    kind: closed\n"
                 "    regions: [us]\n    license: {commercial_use: maybe, name: n}\n"
                 "    latency: {p50_s: 1, p95_s: 2}\n    source: s\n    checked: 2026-01-01\n"
                 "    capabilities: {}\n")
    with pytest.raises(ConfigError, match=r"x\.yaml:7: offerings\.0\.license\.commercial_use"):
        load_catalog_file(f)


def test_an_offering_shutting_down_within_30_days_is_planned_with_a_warning(tmp_path):
    import json
    from datetime import UTC, datetime, timedelta

    from typer.testing import CliRunner

    from imagebroker import Broker
    from imagebroker.cli import app
    from imagebroker.policies.schema import Policy
    from tests.conftest import builtin_providers

    soon = (datetime.now(UTC).date() + timedelta(days=12)).isoformat()
    spec = {"name": "l", "deny": builtin_providers("local"),
            "offerings": [{"id": "local/tiny-shapes", "shutdown": soon}]}
    with Broker(Policy.model_validate(spec), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        cand = b.plan("a red circle").candidates[0]
        result = b.generate("a red circle on a blue background", seed=1)
    expected = f"local/tiny-shapes shuts down on {soon} (in 12 days): move to another offering"
    assert cand.warnings == (expected,) and expected in result.warnings
    policy = tmp_path / "p.yaml"
    policy.write_text(json.dumps(spec))
    routed = CliRunner().invoke(app, ["route", "x", "--policy", str(policy), "--json"])
    assert json.loads(routed.stdout)["candidates"][0]["warnings"] == [expected]
    listed = json.loads(CliRunner().invoke(app, ["providers", "--policy", str(policy), "--json"]).stdout)
    assert next(o for o in listed if o["id"] == "local/tiny-shapes")["shutdown_warning"] == expected
    gone = dict(spec, offerings=[{"id": "local/tiny-shapes", "shutdown": datetime.now(UTC).date().isoformat()}])
    with Broker(Policy.model_validate(gone), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        reasons = {r.offering: r.reasons for r in b.plan("x").rejected}
    assert any(r.startswith("retired (shut down") for r in reasons["local/tiny-shapes"])
