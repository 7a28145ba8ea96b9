"""ComfyUI specifics beyond the conformance suite (fake server: HTTP + websocket on 127.0.0.1)."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

pytest.importorskip("aiohttp")

from imagebroker import Broker
from imagebroker.errors import AllAttemptsFailed
from imagebroker.policies.schema import Policy
from imagebroker.providers.comfyui import build_graph, infer_bindings
from imagebroker.testing.fakes.comfyui import WORKFLOW, FakeComfyUI
from tests.conftest import builtin_providers

HOSTED = builtin_providers("comfyui")


def broker(fake: FakeComfyUI, tmp_path, **extra) -> Broker:
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(WORKFLOW))
    policy = Policy.model_validate({
        "name": "c", "deny": [*HOSTED, "comfyui/flux-schnell"], "local": {"gpu_usd_per_hour": "3.60"},
        "providers": {"comfyui": {"base_url": fake.url, "poll_interval_s": 0.05,
                                  "options": {"workflow": str(wf)}}}, **extra})
    return Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}")


def test_bindings_follow_the_sampler_links():
    b = infer_bindings(WORKFLOW)
    assert b == {"seed": "3.inputs.seed", "steps": "3.inputs.steps", "guidance": "3.inputs.cfg",
                 "prompt": "6.inputs.text", "negative": "7.inputs.text", "width": "5.inputs.width",
                 "height": "5.inputs.height", "batch": "5.inputs.batch_size", "strength": "3.inputs.denoise"}
    g = build_graph(WORKFLOW, b, {"prompt": "a cat", "seed": 9, "width": 512, "steps": None})
    assert g["6"]["inputs"]["text"] == "a cat" and g["3"]["inputs"]["seed"] == 9
    assert g["5"]["inputs"]["width"] == 512 and g["3"]["inputs"]["steps"] == 20  # None leaves the template
    assert WORKFLOW["6"]["inputs"]["text"] == "positive"                          # the template is untouched


def test_edit_bindings_find_the_load_image_nodes_and_the_encoded_latent():
    from imagebroker.testing.fakes.comfyui import WORKFLOW_INPAINT

    b = infer_bindings(WORKFLOW_INPAINT)
    assert b["image"] == "10.inputs.image" and b["mask"] == "12.inputs.image"
    assert b["mask_channel"] == "12.inputs.channel" and b["strength"] == "3.inputs.denoise"
    assert "width" not in b   # the latent is the encoded init image: its size is the image's


def test_websocket_progress_seed_and_the_executed_graph(tmp_path):
    seen = []
    with FakeComfyUI(["ok"]) as fake, broker(fake, tmp_path) as b:
        r = b.generate("a cat", seed=42, steps=8, size="512x768", n=2, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 8) for i in range(1, 9)]
    assert [i.seed for i in r.images] == [42, None] and r.images[0].width == 512   # one seed for the batch
    sent = json.loads(Image.open(io.BytesIO(r.images[0].data)).text["prompt"])
    assert sent["6"]["inputs"]["text"] == "a cat" and sent["3"]["inputs"]["seed"] == 42
    assert r.cost.status == "priced" and r.cost.units["gpu_seconds"] > 0


def test_polling_fallback_when_there_is_no_websocket(tmp_path):
    with FakeComfyUI(["nows"]) as fake, broker(fake, tmp_path) as b:
        r = b.generate("a cat", size="256x256")
    assert len(r.images) == 1 and r.offering == "comfyui/sdxl"


def test_a_validation_error_names_the_node_and_is_not_retried(tmp_path):
    with FakeComfyUI(["nodeerror"]) as fake, broker(fake, tmp_path) as b, \
            pytest.raises(AllAttemptsFailed) as exc:
        b.generate("a cat", size="256x256")
    (attempt,) = exc.value.attempts
    assert "node 4 (CheckpointLoaderSimple): value_not_in_list" in attempt.error


def test_out_of_memory_is_retried(tmp_path):
    with FakeComfyUI(["oom", "ok"]) as fake, broker(fake, tmp_path, retry={"initial_delay_s": 0.01}) as b:
        r = b.generate("a cat", size="256x256")
    assert [a.error_type for a in r.attempts] == ["ProviderUnavailable", None]
    assert "OutOfMemoryError" in r.attempts[0].error


def test_timeout_interrupts_and_dequeues(tmp_path):
    with FakeComfyUI(["timeout"]) as fake, broker(fake, tmp_path, timeout_s=0.5,
                                                  retry={"max_attempts": 1}) as b:
        with pytest.raises(AllAttemptsFailed):
            b.generate("a cat", size="256x256")
        deadline = time.time() + 5
        while not fake.deleted and time.time() < deadline:
            time.sleep(0.05)
        assert fake.interrupted and fake.deleted == list(fake.interrupted)


def test_without_a_server_the_offering_says_what_to_set():
    with Broker(Policy(name="c", deny=HOSTED)) as b:
        reasons = {r.offering: r.reasons for r in b.plan("x").rejected}
    assert any("no ComfyUI server configured: set providers.comfyui.base_url" in r for r in reasons["comfyui/sdxl"])


def test_the_example_policy_and_workflow_in_the_readme_generate(tmp_path):
    from pathlib import Path

    import yaml
    from typer.testing import CliRunner

    from imagebroker.cli import app

    root = Path(__file__).resolve().parents[1]
    example = yaml.safe_load((root / "examples/comfyui/policy.yaml").read_text())
    workflow = root / example["providers"]["comfyui"]["options"]["workflow"]
    assert infer_bindings(json.loads(workflow.read_text())).keys() == {
        "seed", "steps", "guidance", "prompt", "negative", "width", "height", "batch", "strength"}
    with FakeComfyUI(["ok"]) as fake:
        example["providers"]["comfyui"].update(base_url=fake.url, poll_interval_s=0.05)
        example["providers"]["comfyui"]["options"]["workflow"] = str(workflow)
        example["deny"] = [*example["deny"], *HOSTED]   # no keys here anyway: keeps the plan to ComfyUI
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump(example))
        result = CliRunner().invoke(app, ["generate", "a cat", "--size", "512x512", "--policy", str(policy),
                                          "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["offering"] == "comfyui/sdxl" and data["cost"]["status"] == "priced"
    assert fake.requests and json.loads(fake.requests[-1]["body"])["prompt"]["6"]["inputs"]["text"] == "a cat"
