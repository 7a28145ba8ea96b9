from decimal import Decimal
from pathlib import Path

import pytest

from imagebroker.errors import ConfigError
from imagebroker.policies.loader import load_policy, preset_names
from imagebroker.policies.planner import effective_settings
from imagebroker.types import ImageRequest


def test_presets_exist_and_load():
    assert {"cheapest", "fastest", "eu-only", "local-first", "commercial-safe", "default"} <= set(
        preset_names())
    for name in preset_names():
        assert load_policy(name).name == name


def test_extends_merges_a_preset_under_the_file(tmp_path: Path):
    p = tmp_path / "team.yaml"
    p.write_text("extends: eu-only\nobjective: fastest\nconstraints:\n  max_cost_per_image_usd: 0.05\n")
    policy = load_policy(p)
    assert policy.name == "team" and policy.objective == "fastest"
    assert policy.constraints.regions == ("eu", "on_prem")            # from the preset
    assert str(policy.constraints.max_cost_per_image_usd) == "0.05"   # from the file


@pytest.mark.parametrize("text, where", [
    ("constraints:\n  max_cost_per_image_usd: 0.05\n  regionz: [eu]\n",
     "p.yaml:3: constraints.regionz: unknown key"),
    ("objective: cheapest\nbudgets:\n  - name: b\n    period: fortnight\n    limit_usd: 5\n",
     "p.yaml:4: budgets.0.period: Input should be"),
    ("objective: cheapskate\n", "p.yaml:1: objective: Input should be"),
    ("rules:\n  - name: r\n    when: {tagz: {a: b}}\n", "p.yaml:3: rules.0.when.tagz: unknown key"),
    ("constraints: [\n", "p.yaml:2: not valid YAML"),
    ("extends: nonsense-preset\n", "no preset named 'nonsense-preset'"),
])
def test_policy_errors_name_file_line_and_field(tmp_path: Path, text, where):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_policy(tmp_path / "p.yaml")
    assert where in str(exc.value).replace(str(tmp_path) + "/", "")


def test_policy_found_from_env_then_local_file_then_default(tmp_path: Path, monkeypatch):
    assert load_policy().name == "default"
    (tmp_path / "imagebroker.yaml").write_text("name: here\nobjective: best\n")
    assert load_policy().name == "here"
    monkeypatch.setenv("IMAGEBROKER_POLICY", "fastest")
    assert load_policy().name == "fastest"


def test_first_matching_rule_merges_over_the_defaults(tmp_path: Path):
    p = tmp_path / "p.yaml"
    p.write_text(
        "constraints: {max_cost_per_image_usd: 0.10, licenses: commercial}\n"
        "rules:\n"
        "  - name: drafts\n    when: {tags: {stage: draft}}\n"
        "    set: {constraints: {max_cost_per_image_usd: 0.01}, objective: fastest}\n"
        "  - name: lora\n    when: {adapters: true}\n    set: {prefer: ['local/*']}\n")
    policy = load_policy(p)
    draft = effective_settings(ImageRequest(prompt="x", tags={"stage": "draft"}), policy)
    assert draft.rule == "drafts" and draft.objective == "fastest"
    assert str(draft.constraints.max_cost_per_image_usd) == "0.01"
    assert draft.constraints.licenses == "commercial"   # not given by the rule: kept
    plain = effective_settings(ImageRequest(prompt="x"), policy)
    assert plain.rule is None and plain.constraints.max_cost_per_image_usd == Decimal("0.10")


PRICE_OVERRIDES = [   # (offering, price lines under `price:`, field, line of the bad value)
    ("replicate/black-forest-labs/flux-dev", ['usd: "-0.02"'], "price.usd", 5),
    ("bfl/flux-2-flex", ['first_mp_usd: "0.03"', 'usd_per_mp: "-0.01"'], "price.usd_per_mp", 6),
    ("bfl/flux-2-flex", ['first_mp_usd: "-0.03"'], "price.first_mp_usd", 5),
    ("replicate/stability-ai/sdxl", ["usd_per_second: -0.001"], "price.usd_per_second", 5),
    ("bfl/flux-kontext-max", ["credits: -4"], "price.credits", 5),
    ("google/gemini-2.5-flash-image", ['image_output: "-0.00003"'], "price.image_output", 5),
    ("comfyui/flux-schnell", ['cpu_usd_per_hour: "-1"'], "price.cpu_usd_per_hour", 5),
    ("openai/dall-e-3", ["table:", "  - size: 1024x1024", '    usd: "-0.04"'], "price.table.0.usd", 7),
]


@pytest.mark.parametrize("oid, price, field, line", PRICE_OVERRIDES)
def test_a_negative_price_in_a_policy_override_names_file_line_and_field(tmp_path: Path, oid, price,
                                                                        field, line):
    p = tmp_path / "p.yaml"
    p.write_text("objective: cheapest\nofferings:\n  - id: " + oid + "\n    price:\n"
                 + "".join(f"      {x}\n" for x in price))
    with pytest.raises(ConfigError) as exc:
        load_policy(p)
    assert str(exc.value) == (f"{p}:{line}: offerings.0.{field}: "
                              "Input should be greater than or equal to 0")


def test_a_negative_price_fails_policy_check_with_exit_2(tmp_path: Path):
    from typer.testing import CliRunner

    from imagebroker.cli import app

    p = tmp_path / "p.yaml"
    p.write_text("objective: cheapest\nofferings:\n  - id: replicate/black-forest-labs/flux-dev\n"
                 "    price: {usd: \"-0.02\", source: our contract, checked: 2026-11-01}\n")
    result = CliRunner().invoke(app, ["policy", "check", str(p)])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "p.yaml:4: offerings.0.price.usd: Input should be greater than or equal to 0" in out
    assert "Traceback" not in result.output


def test_a_zero_price_is_a_price(tmp_path: Path):
    from imagebroker.policies.effective import effective_catalog
    from imagebroker.providers.catalog import builtin_catalog

    p = tmp_path / "p.yaml"
    p.write_text('offerings:\n  - id: replicate/black-forest-labs/flux-dev\n    price: {usd: "0"}\n')
    catalog = effective_catalog(load_policy(p), builtin_catalog())
    assert catalog.resolve("replicate/black-forest-labs/flux-dev").price.usd == Decimal(0)


def test_a_negative_price_in_a_catalog_file_names_file_line_and_field(tmp_path: Path):
    from imagebroker.providers.catalog import load_catalog_file

    f = tmp_path / "x.yaml"
    f.write_text("provider: x\ncatalog_version: 1\nofferings:\n  - model: m\n    kind: closed\n"
                 "    regions: [us]\n    license: {commercial_use: 'yes', name: n}\n"
                 "    latency: {p50_s: 1, p95_s: 2}\n    source: s\n    checked: 2026-01-01\n"
                 "    capabilities: {}\n    price:\n      unit: per_image\n      usd: '-0.5'\n"
                 "      source: s\n      checked: 2026-01-01\n      confidence: high\n")
    with pytest.raises(ConfigError) as exc:
        load_catalog_file(f)
    assert str(exc.value) == (f"{f}:14: offerings.0.price.usd: "
                              "Input should be greater than or equal to 0")


def test_an_error_in_inherited_offerings_names_the_file_they_are_in(tmp_path: Path):
    (tmp_path / "base.yaml").write_text(
        "objective: cheapest\nofferings:\n  - id: replicate/black-forest-labs/flux-dev\n"
        "    price: {usd: \"-1\"}\n")
    (tmp_path / "team.yaml").write_text("extends: base.yaml\nobjective: fastest\n")
    with pytest.raises(ConfigError, match=r"base\.yaml:4: offerings\.0\.price\.usd: Input should be"):
        load_policy(tmp_path / "team.yaml")


def test_a_partial_override_of_an_offering_only_a_given_catalog_has_still_loads(tmp_path: Path):
    """What an entry lacks is judged once it is merged over the catalog the Broker is given."""
    from imagebroker.policies.effective import effective_catalog
    from imagebroker.providers.catalog import Catalog
    from imagebroker.providers.offering import Offering
    from imagebroker.testing.mock import mock_offering

    p = tmp_path / "p.yaml"
    p.write_text('offerings:\n  - id: mock/a\n    price: {usd: "0.07"}\n')
    policy = load_policy(p)
    given = Catalog([Offering.model_validate({"id": "mock/a", **mock_offering("a")})], "t")
    catalog = effective_catalog(policy, given)
    assert catalog.resolve("mock/a").price.usd == Decimal("0.07")


@pytest.mark.parametrize("where", ["name", "rule", "budget"])
def test_names_the_ledger_stores_are_checked_against_its_limits(tmp_path, where):
    long = "n" * 201
    body = {"name": f"name: {long}\n", "rule": f"rules:\n  - name: {long}\n",
            "budget": f"budgets:\n  - {{name: {long}, period: day, limit_usd: 1}}\n"}[where]
    p = tmp_path / "p.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError, match="at most 200 characters"):
        load_policy(p)


@pytest.mark.parametrize(("ray", "line", "message"), [
    ("    deployment: {replicas: 2, autoscaling: {max_replicas: 4}}\n", 4,
     "local.ray.deployment: set replicas or autoscaling, not both"),
    ("    deployment: {autoscaling: {min_replicas: 3, max_replicas: 2}}\n", 4,
     "local.ray.deployment.autoscaling: min_replicas 3 is over max_replicas 2"),
    ("    app: 'my app'\n", 4, "local.ray.app: String should match pattern"),
])
def test_a_ray_engine_mistake_names_its_line_and_field(tmp_path: Path, ray: str, line: int, message: str):
    f = tmp_path / "p.yaml"
    f.write_text("local:\n  engine: ray\n  ray:\n" + ray)
    with pytest.raises(ConfigError) as exc:
        load_policy(f)
    assert str(exc.value).startswith(f"{f}:{line}: {message}")


def test_the_ray_engine_places_each_model_by_its_own_deployment_or_the_default(tmp_path: Path):
    f = tmp_path / "p.yaml"
    f.write_text("local:\n  engine: ray\n  ray: {deployment: {num_cpus: 2}}\n  models:\n"
                 "    big: {source: some/model, ray: {num_gpus: 1, autoscaling: {max_replicas: 8}}}\n"
                 "    small: {source: other/model}\n")
    local = load_policy(f).local
    assert local.deployment("big").device == "cuda" and local.deployment("big").autoscaling.max_replicas == 8
    assert local.deployment("small").device == "cpu" and local.deployment("small").num_cpus == 2


@pytest.mark.parametrize(("model", "message"), [
    ("{source: /m/flux-Q8_0.gguf, family: flux}", "a .gguf source is a quantized denoiser: set quantization: gguf"),
    ("{source: /m/flux-Q8_0.gguf, family: flux, quantization: gguf}", "quantization gguf needs base"),
    ("{source: /m/x.gguf, base: /m/sd, family: sd, quantization: gguf}",
     "quantization gguf loads a FLUX or SD3 transformer"),
    ("{source: /m/sd, quantization: gguf}", "quantization gguf needs a .gguf file as source"),
])
def test_a_gguf_model_needs_its_file_its_base_and_a_transformer_family(tmp_path: Path, model: str, message: str):
    f = tmp_path / "p.yaml"
    f.write_text(f"local:\n  models:\n    m: {model}\n")
    with pytest.raises(ConfigError, match=f"^{f}:3: local.models.m: {message}"):
        load_policy(f)
