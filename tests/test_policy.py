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
