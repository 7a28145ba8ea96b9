"""`python -m imagebroker.testing serve PROVIDER`, then `imagebroker generate` against it, end to end."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from imagebroker.providers.registry import provider_class
from imagebroker.testing.fakes import fakes
from tests.conftest import builtin_providers

ROOT = Path(__file__).parents[1]
OFFERING = {
    "together": ("together/black-forest-labs/FLUX.1-schnell", "0.002831155"),  # 1.048576 MP x $0.0027
    "stability": ("stability/stable-image-core", "0.03"),                      # 3 credits
    "bfl": ("bfl/flux-2-klein-4b", "0.014048576"),                             # $0.014 + 0.048576 MP x $0.001
    "fal": ("fal/fal-ai/flux/schnell", "0.003"),                               # 0.79 MP -> 1 MP x $0.003
    "openai": ("openai/gpt-image-2", "0.125055"),     # 3 prompt tokens x $5/M + 4168 image tokens (auto) x $30/M
    "google": ("google/gemini-3.1-flash-image", "0.0672045"),  # 9 x $0.5/M + 1120 image tokens x $60/M
    "replicate": ("replicate/black-forest-labs/flux-schnell", "0.003"),  # 1 output x $0.003
    "comfyui": ("comfyui/sdxl", None),  # GPU-seconds from the history timestamps x $3.60/h
    "xai": ("xai/grok-imagine-image", "0.02"),              # 200,000,000 ticks reported, 10^10 ticks a dollar
    "recraft": ("recraft/recraftv4_1", "0.035"),            # 35 API units reported, 1,000 units a dollar
    "azure": ("azure/gpt-image-1.5", "0.13318"),   # 12 text tokens x $5/M + 4160 image tokens (high) x $32/M
    "byteplus": ("byteplus/seedream-4-0-250828", "0.03"),   # 1 generated image x $0.03
    "ideogram": ("ideogram/ideogram-v3-turbo", "0.03"),     # 1 image at TURBO
    "dashscope": ("dashscope/wan2.2-t2i-flash", "0.025"),   # usage.image_count 1 x $0.025 (Singapore)
    "runway": ("runway/gen4_image", "0.08"),                # 1024:1024 is a 1080p-class ratio: 8 credits
    "luma": ("luma/photon-flash-1", "0.0019"),              # 1 image
}
HOSTED = builtin_providers()


@pytest.mark.parametrize("provider", sorted(fakes()))
def test_generate_against_a_served_fake(provider, tmp_path):
    offering, usd = OFFERING[provider]
    server = subprocess.Popen([sys.executable, "-m", "imagebroker.testing", "serve", provider],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        url = server.stdout.readline().split()[-1]
        base = url + fakes()[provider].prefix
        policy = tmp_path / "p.yaml"
        settings: dict = {"base_url": base, "poll_interval_s": 0.05}
        if provider == "comfyui":
            from imagebroker.testing.fakes.comfyui import WORKFLOW

            (tmp_path / "wf.json").write_text(json.dumps(WORKFLOW))
            settings["options"] = {"workflow": str(tmp_path / "wf.json")}
        policy.write_text(json.dumps({"extends": "default", "deny": [p for p in HOSTED if p != provider],
                                      "prefer": [offering], "objective": "ordered",
                                      "local": {"gpu_usd_per_hour": "3.60"}, "providers": {provider: settings}}))
        env = {**os.environ, "IMAGEBROKER_LEDGER_URL": f"sqlite:///{tmp_path / 'l.db'}", "PYTHONPATH": str(ROOT)}
        if provider_class(provider).api_key_env:
            env[provider_class(provider).api_key_env] = fakes()[provider].key
        out = subprocess.run([sys.executable, "-m", "imagebroker.cli", "generate", "a red circle", "--policy",
                              str(policy), "--out", str(tmp_path / "out"), "--json"],
                             env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.terminate()
        server.wait()
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    if usd is None:  # priced from measured GPU-seconds: not known in advance, but never $0
        usd = data["cost"]["usd"]
        seconds = Decimal(str(data["cost"]["detail"].split(" s ")[0]))
        assert Decimal(usd) == (seconds * Decimal("3.60") / 3600).quantize(Decimal("1e-9")).normalize() > 0
    assert data["offering"] == offering and Decimal(data["cost"]["usd"]) == Decimal(usd)
    image = data["images"][0]
    assert Image.open(image["path"]).size == (image["width"], image["height"])
    with sqlite3.connect(tmp_path / "l.db") as conn:
        row = conn.execute("select offering, cost_nusd, cost_status from calls").fetchone()
    assert row == (offering, int(Decimal(usd) * 10**9), "priced")
