"""Drop-in swapping: a third-party provider package registers through the entry point, appears in
`imagebroker providers`, and a policy moves traffic to it with no code change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import builtin_providers

ROOT = Path(__file__).parents[1]
OFFERING = {"id": "example/painter", "provider": "example", "model": "painter", "kind": "closed",
            "regions": ["eu"], "license": {"commercial_use": "yes", "name": "example"},
            "latency": {"p50_s": 1, "p95_s": 2}, "source": "example", "checked": "2026-11-20",
            "capabilities": {"default_size": "64x64", "size_rule": {"min_side": 64}, "max_n": 4},
            "price": {"unit": "per_image", "usd": "0.002", "source": "example", "checked": "2026-11-20",
                      "confidence": "high"}}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("src") / "plugin_example"
    shutil.copytree(ROOT / "tests" / "plugin_example", source)  # build outside the repository
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True)
    return target


def cli(site: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "EXAMPLE_API_KEY": "k",
           "IMAGEBROKER_LEDGER_URL": f"sqlite:///{tmp_path / 'l.db'}"}
    return subprocess.run([sys.executable, "-m", "imagebroker.cli", *args], env=env, capture_output=True,
                          text=True, cwd=tmp_path)


def write_policy(tmp_path: Path, prefer: str) -> Path:
    from imagebroker.testing.mock import mock_offering

    p = tmp_path / "policy.yaml"
    p.write_text(json.dumps({"extends": "default", "objective": "ordered", "prefer": [prefer],
                             "deny": builtin_providers(),
                             "offerings": [OFFERING, mock_offering("standby")]}, default=str))
    return p


def test_plugin_appears_in_providers(site, tmp_path):
    out = cli(site, tmp_path, "providers", "--policy", str(write_policy(tmp_path, "example/*")), "--json")
    assert out.returncode == 0, out.stderr
    painter = {o["id"]: o for o in json.loads(out.stdout)}["example/painter"]
    assert painter["available"] is True and painter["provider"] == "example"


def test_changing_the_policy_moves_traffic_without_code(site, tmp_path):
    to_plugin = cli(site, tmp_path, "generate", "x", "--policy", str(write_policy(tmp_path, "example/*")),
                    "--out", str(tmp_path), "--json")
    assert to_plugin.returncode == 0, to_plugin.stderr
    assert json.loads(to_plugin.stdout)["offering"] == "example/painter"
    to_mock = cli(site, tmp_path, "generate", "x", "--policy", str(write_policy(tmp_path, "mock/*")),
                  "--out", str(tmp_path), "--json")
    assert json.loads(to_mock.stdout)["offering"] == "mock/standby"


def test_a_plugins_own_catalog_is_routed_to_with_no_offerings_in_the_policy(site, tmp_path):
    policy = tmp_path / "bare.yaml"
    policy.write_text(json.dumps({"name": "bare", "deny": builtin_providers(), "prefer": ["example/painter"]}))
    listed = cli(site, tmp_path, "providers", "--policy", str(policy), "--json")
    assert listed.returncode == 0, listed.stderr
    painter = {o["id"]: o for o in json.loads(listed.stdout)}["example/painter"]
    assert painter["price"]["usd"] == "0.002" and painter["regions"] == ["eu"] and painter["available"]
    made = cli(site, tmp_path, "generate", "a cat", "--policy", str(policy), "--out", str(tmp_path), "--json")
    assert made.returncode == 0, made.stderr
    data = json.loads(made.stdout)
    assert data["offering"] == "example/painter" and data["cost"]["usd"] == "0.002"
