"""Structural control (ControlNet) on the local backend, with tiny ControlNets made in code from the tiny SD
UNet: control changes the output, several at once, the base output is unchanged afterwards, canny edges made
here, planning that rejects offerings without the kind, and `--control` on the command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

pytest.importorskip("diffusers")

from imagebroker import Broker
from imagebroker.control import Control, canny
from imagebroker.errors import NoRouteError, RequestError
from imagebroker.inputs import read_input
from imagebroker.policies.schema import Policy
from imagebroker.types import ImageRequest
from tests.conftest import builtin_providers
from tests.tiny_pipelines import build_tiny_sd, make_controlnet

OTHERS = [*builtin_providers("local"), "mock", "fakehttp", "local/sdxl", "local/sd15", "local/flux-*",
          "local/tiny-shapes"]
RULE = {"min_side": 64, "max_side": 256, "multiple_of": 16}


def square(left: bool, size: int = 64) -> bytes:
    """A white square on black, in the left or the right half."""
    image = Image.new("RGB", (size, size))
    x = size // 8 if left else size // 2 + size // 8
    ImageDraw.Draw(image).rectangle([x, size // 4, x + size // 4, size // 4 + size // 4], fill="white")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    sd = build_tiny_sd(root / "sd")
    return {"sd": sd, "canny": make_controlnet(sd, root / "cn-canny", 1),
            "depth": make_controlnet(sd, root / "cn-depth", 2)}


def policy_data(models: dict[str, Path]) -> dict:
    nets = {"canny": str(models["canny"]), "depth": str(models["depth"])}
    return {"name": "control", "deny": OTHERS,
            "local": {"models": {"tsd": {"source": str(models["sd"]), "family": "sd", "steps": 4,
                                         "controlnets": nets},
                                 "plain": {"source": str(models["sd"]), "family": "sd", "steps": 4}}},
            "offerings": [{"id": f"local/{m}", "capabilities": {"default_size": "64x64", "size_rule": RULE}}
                          for m in ("tsd", "plain")]}


@pytest.fixture(scope="module")
def broker(models, tmp_path_factory):
    b = Broker(Policy.model_validate(policy_data(models)),
               ledger=f"sqlite:///{tmp_path_factory.mktemp('c') / 'l.db'}")
    yield b
    b.close()


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")).astype(int)


def test_control_changes_the_output_and_the_base_is_unchanged_afterwards(broker):
    base = broker.generate("a cat", model="local/tsd", seed=3)
    edges = canny(read_input(square(left=True)))
    held = broker.generate("a cat", model="local/tsd", seed=3, control=[{"kind": "canny", "image": edges}])
    assert np.abs(pixels(held.images[0]) - pixels(base.images[0])).max() > 0
    assert held.applied["control"][0]["kind"] == "canny" and held.applied["control"][0]["scale"] == 1.0
    other = broker.generate("a cat", model="local/tsd", seed=3,
                            control=[{"kind": "canny", "image": canny(read_input(square(left=False)))}])
    assert other.images[0].data != held.images[0].data   # the control image itself matters
    weak = broker.generate("a cat", model="local/tsd", seed=3,
                           control=[{"kind": "canny", "image": edges, "scale": 0.0}])
    assert np.abs(pixels(weak.images[0]) - pixels(base.images[0])).max() <= 1   # scale 0 holds nothing
    after = broker.generate("a cat", model="local/tsd", seed=3)
    assert after.images[0].data == base.images[0].data


def test_several_controlnets_at_once_with_their_scales(broker):
    edges = canny(read_input(square(left=True)))
    one = broker.generate("a cat", model="local/tsd", seed=5, control=[{"kind": "canny", "image": edges}])
    both = broker.generate("a cat", model="local/tsd", seed=5, control=[
        {"kind": "canny", "image": edges}, {"kind": "depth", "image": square(left=False), "scale": 0.7}])
    assert both.images[0].data != one.images[0].data
    assert [(c["kind"], c["scale"]) for c in both.applied["control"]] == [("canny", 1.0), ("depth", 0.7)]


def test_canny_made_here_outlines_the_square():
    edges = np.asarray(canny(read_input(square(left=True))).pil().convert("L")) > 0
    _, xs = np.nonzero(edges)
    assert edges.any() and xs.max() < 32   # only around the square in the left half
    assert not edges[20:28, 12:20].any()   # not inside it: an outline, not a fill
    made = Control(kind="canny", image=square(left=True), preprocess=True)
    assert made.image.data == canny(read_input(square(left=True))).data


def test_planning_sends_control_only_where_that_kind_is_served(broker):
    plan = broker.plan("a cat", control=[{"kind": "canny", "image": square(True)}])
    assert [c.offering for c in plan.candidates] == ["local/tsd"]
    plain = next(r for r in plan.rejected if r.offering == "local/plain")
    assert "no ControlNet for canny" in plain.reasons
    with pytest.raises(NoRouteError, match=r"no ControlNet for pose \(it has canny, depth\)"):
        broker.generate("a cat", control=[{"kind": "pose", "image": square(True)}])


def test_control_mistakes_are_found_before_anything_runs():
    with pytest.raises(RequestError, match="control kind 'edge' is not one of canny"):
        ImageRequest(prompt="x", control=[{"kind": "edge", "image": square(True)}])
    with pytest.raises(RequestError, match="control depth: preprocess can make only canny"):
        ImageRequest(prompt="x", control=[{"kind": "depth", "image": square(True), "preprocess": True}])
    with pytest.raises(RequestError, match=r"start 0\.8 must be before end 0\.5"):
        ImageRequest(prompt="x", control=[{"kind": "canny", "image": square(True), "start": 0.8, "end": 0.5}])


def test_the_cli_takes_control_and_reports_it(models, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(policy_data(models)))
    (tmp_path / "square.png").write_bytes(square(True))
    run = [sys.executable, "-m", "imagebroker", "generate", "a cat", "--policy", str(path), "--seed", "1",
           "--ledger", str(tmp_path / "l.db"), "--out", str(tmp_path), "--json"]
    out = subprocess.run([*run, "--control", f"canny+:{tmp_path / 'square.png'}:0.8"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    control, = json.loads(out.stdout)["applied"]["control"]
    assert (control["kind"], control["scale"], control["preprocess"]) == ("canny", 0.8, True)
    bad = subprocess.run([*run, "--control", "canny:/no/such.png"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr + bad.stdout
    assert json.loads(bad.stdout)["error"]["message"] == (
        "--control canny:/no/such.png: control canny image /no/such.png: cannot read it (No such file or directory)")


def test_a_what_if_replays_a_control_call_where_that_kind_is_served(models, tmp_path):
    from imagebroker.broker.ledger.store import Ledger
    from imagebroker.broker.whatif import whatif

    data = policy_data(models)
    with Broker(Policy.model_validate(data), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        b.generate("a cat", model="local/tsd", seed=1, control=[{"kind": "canny", "image": square(True)}])
        catalog = b.catalog
    without = Policy.model_validate(data | {"deny": [*OTHERS, "local/tsd"]})   # only the model without one
    result = whatif(Ledger(f"sqlite:///{tmp_path / 'l.db'}", read_only=True), without, catalog)
    assert result.calls == 1 and result.partial == 0 and result.unroutable == 1


def test_control_with_an_edit_uses_the_controlnet_img2img_and_inpainting_pipelines(broker):
    from tests.conftest import left_half_mask, png

    init, edges = png((64, 64), (200, 30, 30)), canny(read_input(square(left=True)))
    plain = broker.generate("a cat", model="local/tsd", seed=2, images=[init], strength=0.8)
    held = broker.generate("a cat", model="local/tsd", seed=2, images=[init], strength=0.8,
                           control=[{"kind": "canny", "image": edges}])
    assert np.abs(pixels(held.images[0]) - pixels(plain.images[0])).max() > 0
    assert held.applied["task"] == "img2img" and held.applied["control"][0]["kind"] == "canny"
    mask = left_half_mask((64, 64))
    painted = broker.generate("a cat", model="local/tsd", seed=2, images=[init], mask=mask,
                              control=[{"kind": "canny", "image": edges}])
    unheld = broker.generate("a cat", model="local/tsd", seed=2, images=[init], mask=mask)
    out, before = pixels(painted.images[0]), pixels(unheld.images[0])
    assert np.abs(out[:, :32] - before[:, :32]).max() > 0        # the control moved the masked half
    assert (out[:, 40:] == np.asarray(read_input(init).pil().convert("RGB"))[:, 40:]).all()   # the rest kept
    again = broker.generate("a cat", model="local/tsd", seed=2, images=[init], strength=0.8)
    assert again.images[0].data == plain.images[0].data   # the plain img2img pipeline is unchanged


def test_a_flux_model_takes_its_controlnet_the_same_way(tmp_path):
    from tests.tiny_pipelines import build_tiny_flux, make_flux_controlnet

    flux = build_tiny_flux(tmp_path / "flux")
    net = make_flux_controlnet(flux, tmp_path / "flux-canny", 3)
    data = {"name": "fluxcontrol", "deny": OTHERS,
            "local": {"models": {"tflux": {"source": str(flux), "family": "flux", "steps": 3,
                                           "controlnets": {"canny": str(net)}}}},
            "offerings": [{"id": "local/tflux", "capabilities": {"default_size": "64x64", "size_rule": RULE}}]}
    with Broker(Policy.model_validate(data), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        base = b.generate("a cat", model="local/tflux", seed=3)
        edges = canny(read_input(square(left=True)))
        held = b.generate("a cat", model="local/tflux", seed=3, control=[{"kind": "canny", "image": edges}])
        after = b.generate("a cat", model="local/tflux", seed=3)
    assert np.abs(pixels(held.images[0]) - pixels(base.images[0])).max() > 0
    assert after.images[0].data == base.images[0].data
