"""The official `openai` Node SDK (the npm package, installed once per machine into the test cache) as the client
of the gateway: generations, a multipart edit, an error mapped to its own class, and streaming. Skipped where
Node.js or npm is not installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import png
from tests.test_gateway import SCHNELL, gateway, make_key

NODE_CLIENT = Path(__file__).parent / "node" / "openai_client.mjs"
KONTEXT = "together/black-forest-labs/FLUX.1-kontext-pro"
pytestmark = pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")), reason="needs Node.js and npm")


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """The openai npm package (major 7), installed beside a copy of the client script."""
    home = Path(os.environ.get("IMAGEBROKER_NODE_CACHE", Path.home() / ".cache" / "imagebroker-tests" / "node"))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "node_modules" / "openai" / "package.json").exists():
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(home),
                               "openai@7"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(f"npm could not install openai: {done.stderr[-300:]}")
    shutil.copy(NODE_CLIENT, home / NODE_CLIENT.name)
    return home


def test_the_openai_node_sdk_works_unchanged_against_the_gateway(tmp_path, monkeypatch, node_modules):
    init = tmp_path / "init.png"
    init.write_bytes(png((512, 512)))
    with gateway(tmp_path, monkeypatch) as (base, fake):
        key = make_key(tmp_path, "node-app", "--tag", "team=web")
        done = subprocess.run(["node", str(node_modules / NODE_CLIENT.name), f"{base}/v1", key, str(init), KONTEXT],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["generate"]["images"] == 1 and out["generate"]["b64_bytes"] > 100
    each = (Decimal("0.0027") * Decimal(512 * 512) / 10**6).quantize(Decimal("1e-9"))   # $0.0027/MP, 512x512
    assert out["generate"]["offering"] == SCHNELL and Decimal(out["generate"]["cost_usd"]) == each
    assert out["edit"] == {"images": 1, "offering": KONTEXT}
    assert out["error"] == {"bad_request": True, "status": 400}
    assert out["stream"] == ["image_generation.completed"]
    assert fake.generations == 3   # the failed call never reached the provider
