"""Image prompts (IP-Adapter) on the local backend, with a tiny IP-Adapter and a tiny CLIP image encoder made
in code for the tiny SD UNet: a reference image changes the output and which one matters, its scale counts,
several at once, the base output is byte for byte the same after it is unloaded, requests with different
references never share a batch, planning rejects models without one, and `--image-prompt` on the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("diffusers")

from imagebroker import Broker
from imagebroker.errors import AllAttemptsFailed, NoRouteError, RequestError
from imagebroker.policies.schema import Policy
from imagebroker.types import ImageRequest
from tests.conftest import builtin_providers
from tests.tiny_pipelines import build_tiny_sd, make_ip_adapter

OTHERS = [*builtin_providers("local"), "mock", "fakehttp", "local/sdxl", "local/sd15", "local/flux-*",
          "local/tiny-shapes"]
RULE = {"min_side": 64, "max_side": 256, "multiple_of": 16}


def flat(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    sd = build_tiny_sd(root / "sd")
    weights, encoder = make_ip_adapter(sd, root / "ip", 1)
    return {"sd": sd, "weights": weights, "encoder": encoder}


def policy_data(models: dict[str, Path], **local: object) -> dict:
    ip = {"source": str(models["weights"]), "image_encoder": str(models["encoder"])}
    return {"name": "ip", "deny": OTHERS,
            "local": {"models": {"tsd": {"source": str(models["sd"]), "family": "sd", "steps": 4, "ip_adapter": ip},
                                 "plain": {"source": str(models["sd"]), "family": "sd", "steps": 4}}, **local},
            "offerings": [{"id": f"local/{m}", "capabilities": {"default_size": "64x64", "size_rule": RULE}}
                          for m in ("tsd", "plain")]}


@pytest.fixture(scope="module")
def broker(models, tmp_path_factory):
    b = Broker(Policy.model_validate(policy_data(models)),
               ledger=f"sqlite:///{tmp_path_factory.mktemp('ip') / 'l.db'}")
    yield b
    b.close()


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")).astype(int)


def test_an_image_prompt_changes_the_output_and_unloading_restores_the_base(broker):
    base = broker.generate("a cat", model="local/tsd", seed=3)
    red = broker.generate("a cat", model="local/tsd", seed=3, image_prompts=[flat("red")])
    assert np.abs(pixels(red.images[0]) - pixels(base.images[0])).max() > 10
    blue = broker.generate("a cat", model="local/tsd", seed=3, image_prompts=[flat("blue")])
    assert blue.images[0].data != red.images[0].data   # the reference itself matters
    half = broker.generate("a cat", model="local/tsd", seed=3, image_prompts=[{"image": flat("red"), "scale": 0.5}])
    assert half.images[0].data not in (red.images[0].data, base.images[0].data)
    none = broker.generate("a cat", model="local/tsd", seed=3, image_prompts=[{"image": flat("red"), "scale": 0}])
    assert none.images[0].data == base.images[0].data   # scale 0 adds nothing
    assert red.applied["image_prompts"][0]["scale"] == 1.0
    assert red.applied["image_prompts"][0]["image"]["width"] == 48
    after = broker.generate("a cat", model="local/tsd", seed=3)
    assert after.images[0].data == base.images[0].data
    plain = broker.generate("a cat", model="local/plain", seed=3)   # the same weights, never given one
    assert plain.images[0].data == base.images[0].data


def test_several_image_prompts_each_with_its_scale(broker):
    one = broker.generate("a cat", model="local/tsd", seed=5, image_prompts=[flat("red")])
    both = broker.generate("a cat", model="local/tsd", seed=5,
                           image_prompts=[flat("red"), {"image": flat("green"), "scale": 0.7}])
    assert both.images[0].data != one.images[0].data
    assert [p["scale"] for p in both.applied["image_prompts"]] == [1.0, 0.7]
    muted = broker.generate("a cat", model="local/tsd", seed=5,
                            image_prompts=[flat("red"), {"image": flat("green"), "scale": 0}])
    assert np.abs(pixels(muted.images[0]) - pixels(one.images[0])).max() <= 1   # the second one held nothing


def test_requests_with_different_references_never_share_a_batch(models, tmp_path):
    """Concurrent requests coalesce only with the same reference: a pair with the same one runs as one batch,
    a pair with different ones each as its own, and each gets what it would alone."""
    import asyncio

    from imagebroker import AsyncBroker

    policy = Policy.model_validate(policy_data(models, coalesce={"window_ms": 300, "max_batch": 8}))

    async def go() -> tuple[list, list, dict]:
        async with AsyncBroker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            async def one(colour: str):
                return await b.generate("a cat", model="local/tsd", seed=7, image_prompts=[flat(colour)])
            alone = {c: (await one(c)).images[0].data for c in ("red", "blue")}
            same = await asyncio.gather(one("red"), one("red"))
            mixed = await asyncio.gather(one("red"), one("blue"))
            return same, mixed, alone

    same, mixed, alone = asyncio.run(go())
    assert [r.cost.units["batch_images"] for r in same] == [2, 2]   # coalescing is on
    assert [r.cost.units["batch_images"] for r in mixed] == [1, 1]   # but not across references
    assert [r.images[0].data for r in mixed] == [alone["red"], alone["blue"]]


def test_an_ip_adapter_that_does_not_fit_fails_and_leaves_the_model_as_it_was(models, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(models["weights"])
    # its image projection is for another model (it loads after the attention processors are swapped in)
    weights["image_proj.norm.weight"] = weights["image_proj.norm.weight"][:3].contiguous()
    save_file(weights, tmp_path / "wrong.safetensors")
    data = policy_data(models)
    data["local"]["models"]["tsd"]["ip_adapter"]["source"] = str(tmp_path / "wrong.safetensors")
    with Broker(Policy.model_validate(data), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        base = b.generate("a cat", model="local/tsd", seed=4)
        with pytest.raises(AllAttemptsFailed, match="does not fit this model"):
            b.generate("a cat", model="local/tsd", seed=4, image_prompts=[flat("red")])
        after = b.generate("a cat", model="local/tsd", seed=4)
    assert after.images[0].data == base.images[0].data   # nothing of the failed load stayed behind


def test_planning_sends_image_prompts_only_to_a_model_with_an_ip_adapter(broker, models):
    plan = broker.plan("a cat", image_prompts=[flat("red")])
    assert [c.offering for c in plan.candidates] == ["local/tsd"]
    assert "no image prompts (IP-Adapter)" in next(r for r in plan.rejected if r.offering == "local/plain").reasons
    data = policy_data(models)
    data["constraints"] = {"forbid_image_prompts": True}
    with Broker(Policy.model_validate(data), ledger="sqlite:///:memory:") as b, \
            pytest.raises(NoRouteError, match=r"image prompts not allowed by the policy \(forbid_image_prompts\)"):
        b.generate("a cat", image_prompts=[flat("red")])


def test_image_prompt_mistakes_are_found_before_anything_runs():
    with pytest.raises(RequestError, match=r"image_prompts\.0\.scale"):
        ImageRequest(prompt="x", image_prompts=[{"image": flat("red"), "scale": 3}])
    with pytest.raises(RequestError, match=r"image prompt /no/such\.png: cannot read it"):
        ImageRequest(prompt="x", image_prompts=["/no/such.png"])
    with pytest.raises(RequestError, match="at most 4"):
        ImageRequest(prompt="x", image_prompts=[flat("red")] * 5)


def test_a_model_whose_ip_adapter_is_missing_fails_with_its_name(models, tmp_path):
    data = policy_data(models)
    data["local"]["models"]["tsd"]["ip_adapter"]["source"] = str(tmp_path / "gone.safetensors")
    with Broker(Policy.model_validate(data), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        with pytest.raises(AllAttemptsFailed, match=r"IP-Adapter .*gone\.safetensors.* not be loaded: no such file"):
            b.generate("a cat", model="local/tsd", seed=1, image_prompts=[flat("red")])
        assert b.generate("a cat", model="local/tsd", seed=1).images   # the model itself still works


def test_the_cli_takes_image_prompts_and_reports_them(models, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(policy_data(models)))
    (tmp_path / "ref.png").write_bytes(flat("red"))
    run = [sys.executable, "-m", "imagebroker", "generate", "a cat", "--policy", str(path), "--seed", "1",
           "--ledger", str(tmp_path / "l.db"), "--out", str(tmp_path), "--json"]
    out = subprocess.run([*run, "--image-prompt", f"{tmp_path / 'ref.png'}:0.6"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    prompt, = json.loads(out.stdout)["applied"]["image_prompts"]
    assert prompt["scale"] == 0.6
    bad = subprocess.run([*run, "--image-prompt", f"{tmp_path / 'ref.png'}:9"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr + bad.stdout
    assert json.loads(bad.stdout)["error"]["message"].startswith(f"--image-prompt {tmp_path / 'ref.png'}:9: scale")


def test_a_what_if_replays_an_image_prompt_call_where_one_is_served(models, tmp_path):
    from imagebroker.broker.ledger.store import Ledger
    from imagebroker.broker.whatif import whatif

    data = policy_data(models)
    with Broker(Policy.model_validate(data), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        b.generate("a cat", model="local/tsd", seed=1, image_prompts=[flat("red")])
        catalog = b.catalog
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}", read_only=True)
    same = whatif(ledger, Policy.model_validate(data), catalog)
    assert same.calls == 1 and same.unroutable == 0
    without = Policy.model_validate(data | {"deny": [*OTHERS, "local/tsd"]})   # only the model without one
    assert whatif(ledger, without, catalog).unroutable == 1
