"""ComfyUI workflows without a server: compiled onto the local backend (`imagebroker comfyui run`, and the
`local_fallback` of a comfyui offering), converted to Diffusers Python (`imagebroker comfyui convert`), with the
bundled model drawing what the workflow's prompt says."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imagebroker.cli import app
from imagebroker.providers.comfyui.compile import WorkflowError, checkpoint_offering, compile_workflow
from imagebroker.providers.schedulers import problem
from imagebroker.testing.fakes.comfyui import WORKFLOW, WORKFLOW_IMG2IMG, WORKFLOW_INPAINT
from tests.conftest import builtin_providers
from training.tiny_shapes.evaluate import caption, score

runner = CliRunner()


def tiny(prompt: str, seed: int, sampler: str = "euler", schedule: str = "normal") -> dict:
    graph = copy.deepcopy(WORKFLOW)
    graph["4"]["inputs"]["ckpt_name"] = "tiny-shapes.safetensors"
    graph["5"]["inputs"] |= {"width": 64, "height": 64}
    graph["6"]["inputs"]["text"], graph["7"]["inputs"]["text"] = prompt, ""
    graph["3"]["inputs"] |= {"seed": seed, "steps": 20, "cfg": 5.0, "sampler_name": sampler, "scheduler": schedule}
    return graph


# -- compiling ------------------------------------------------------------------------------------------
def test_a_text_to_image_workflow_compiles_to_one_request_per_saved_output():
    graph = WORKFLOW | {"3": {**WORKFLOW["3"], "inputs": {**WORKFLOW["3"]["inputs"], "sampler_name": "dpmpp_2m",
                                                          "scheduler": "karras"}},
                        "12": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                                      "lora_name": "ink.safetensors",
                                                                      "strength_model": 0.7, "strength_clip": 1}}}
    graph["3"]["inputs"]["model"] = ["12", 0]
    (job,) = compile_workflow(graph)
    assert job.node == "9" and job.checkpoint == "sd_xl_base_1.0.safetensors"
    assert job.fields == {"prompt": "positive", "negative_prompt": "negative", "seed": 5, "steps": 20,
                          "guidance_scale": 7.0, "scheduler": "dpmpp_2m+karras", "width": 1024, "height": 1024,
                          "n": 1, "adapters": ({"ref": "ink.safetensors", "scale": 0.7},)}
    assert problem("dpmpp_2m+karras", "sd") is None and "takes no 'karras'" in problem("ddim+karras", "sd")


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde",
                                     "dpmpp_sde", "ddim", "uni_pc", "lcm"])
@pytest.mark.parametrize("schedule", ["normal", "karras", "exponential", "sgm_uniform", "simple"])
def test_every_comfyui_sampler_and_schedule_maps_onto_a_diffusers_scheduler_or_says_why(sampler, schedule):
    pytest.importorskip("diffusers")
    from imagebroker.local_backend import MODELS_DIR
    from imagebroker.local_backend.schedulers import build
    from imagebroker.providers.comfyui.compile import scheduler_name
    from imagebroker.providers.schedulers import SCHEDULES

    name = scheduler_name(sampler, schedule, "3")
    why = problem(name, "sd")
    if why is not None:   # a class that takes no such sigmas: said, never silently ignored
        assert schedule != "normal" and f"takes no {schedule!r} schedule" in why
        return
    config = json.loads((MODELS_DIR / "tiny-shapes/scheduler/scheduler_config.json").read_text())
    built = build(name, "sd", config)
    for key, value in (SCHEDULES[schedule][0] if schedule != "normal" else {}).items():
        assert built.config[key] == value


def test_img2img_and_inpainting_workflows_compile_with_their_input_images(tmp_path):
    for name in ("example.png", "mask.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    (i2i,) = compile_workflow(WORKFLOW_IMG2IMG, tmp_path)
    assert i2i.fields["images"] == [tmp_path / "example.png"] and i2i.fields["strength"] == 0.75
    assert "width" not in i2i.fields and "mask" not in i2i.fields
    (inpaint,) = compile_workflow(WORKFLOW_INPAINT, tmp_path)
    assert inpaint.fields["mask"] == tmp_path / "mask.png" and inpaint.fields["strength"] == 1.0


@pytest.mark.parametrize("graph, says", [
    (WORKFLOW | {"12": {"class_type": "ImageBlur", "inputs": {"image": ["8", 0]}}},
     "node 12 (ImageBlur) cannot run on the local backend"),
    ({"1": {"class_type": "EmptyImage", "inputs": {}}}, "node 1 (EmptyImage) cannot run"),
    ({k: v for k, v in WORKFLOW.items() if k != "9"}, "the workflow saves no image"),
    (WORKFLOW | {"3": {**WORKFLOW["3"], "inputs": {**WORKFLOW["3"]["inputs"], "sampler_name": "res_multistep"}}},
     "node 3: sampler_name 'res_multistep' has no local equivalent"),
    (WORKFLOW_IMG2IMG, "node 10 (LoadImage): image 'example.png' not found"),
])
def test_what_cannot_run_locally_names_the_node(graph, says, tmp_path):
    with pytest.raises(WorkflowError, match=__import__("re").escape(says)):
        compile_workflow(graph, tmp_path)


def test_a_checkpoint_is_a_local_model_by_name_or_by_the_policys_mapping():
    local = ["local/tiny-shapes", "local/sdxl"]
    assert checkpoint_offering("tiny-shapes.safetensors", local, {}) == "local/tiny-shapes"
    assert checkpoint_offering("sd_xl_base_1.0.safetensors", local, {"sd_xl_base_1.0.safetensors": "local/sdxl"}
                               ) == "local/sdxl"
    with pytest.raises(WorkflowError, match="is not a local model: name one of sdxl, tiny-shapes"):
        checkpoint_offering("v1-5.ckpt", local, {})
    with pytest.raises(WorkflowError, match="not a local offering"):
        checkpoint_offering("x.safetensors", local, {"x.safetensors": "fal/fal-ai/flux/dev"})


# -- running it locally, and through a server -----------------------------------------------------------
pytest.importorskip("diffusers")

TRIPLES = [("red", "circle", "blue"), ("yellow", "square", "green"), ("white", "triangle", "black"),
           ("purple", "circle", "orange"), ("green", "square", "white"), ("blue", "triangle", "yellow")]


def test_comfyui_run_draws_what_the_workflows_prompt_says_and_reports_what_it_applied(tmp_path):
    images, reports = [], []
    for i, triple in enumerate(TRIPLES):
        wf = tmp_path / f"wf{i}.json"
        wf.write_text(json.dumps(tiny(caption(*triple), 1000 + i)))
        res = runner.invoke(app, ["comfyui", "run", str(wf), "--out", str(tmp_path / "out"), "--json"])
        assert res.exit_code == 0, res.output
        (output,) = json.loads(res.stdout)["outputs"]
        reports.append(output)
        images.append(np.asarray(Image.open(output["images"][0]["path"]).convert("RGB")))
    scores = score(images, TRIPLES)
    assert scores["foreground"] >= 0.66 and scores["background"] >= 0.66, scores
    first = reports[0]
    assert first["offering"] == "local/tiny-shapes" and first["images"][0]["seed"] == 1000
    assert first["applied"]["steps"] == 20 and first["applied"]["guidance_scale"] == 5.0
    assert first["applied"]["scheduler"] == "euler" and first["workflow"]["sampler_name"] == "euler"
    assert first["cost"]["status"] == "priced"


def test_the_same_workflow_runs_on_a_server_too(tmp_path):
    from imagebroker import Broker
    from imagebroker.policies.schema import Policy
    from imagebroker.testing.fakes.comfyui import FakeComfyUI

    graph = tiny(caption(*TRIPLES[0]), 1000)
    graph["4"]["inputs"]["ckpt_name"] = "tiny_sd15_random.safetensors"   # one the fake server has
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(graph))
    with FakeComfyUI() as fake, Broker(Policy.model_validate({
            "name": "c", "deny": [*builtin_providers("comfyui"), "comfyui/flux-schnell"],
            "local": {"gpu_usd_per_hour": "2"}, "providers": {"comfyui": {"base_url": fake.url,
                                                                          "options": {"workflow": str(wf)}}}}),
            ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        r = b.generate(caption(*TRIPLES[0]), size="64x64", seed=1000, steps=20)
    sent = json.loads(next(x["body"] for x in fake.requests if x["path"] == "/prompt"))["prompt"]
    assert sent["3"]["inputs"]["seed"] == 1000 and sent["3"]["inputs"]["sampler_name"] == "euler"
    assert r.images[0].width == 64 and r.cost.status == "priced"


def test_a_comfyui_offering_falls_back_to_the_local_backend_when_no_server_answers(tmp_path):
    from imagebroker import Broker
    from imagebroker.policies.schema import Policy

    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(tiny("x", 1)))
    policy = Policy.model_validate({
        "name": "c", "deny": [*builtin_providers("comfyui"), "comfyui/flux-schnell"],
        "local": {"gpu_usd_per_hour": "2"},
        "providers": {"comfyui": {"base_url": "http://127.0.0.1:9", "options": {
            "workflow": str(wf), "local_fallback": True}}},
        "offerings": [{"id": "comfyui/sdxl", "capabilities": {"default_size": "64x64"}}]})
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        r = b.generate(caption(*TRIPLES[1]), seed=7)
    assert r.offering == "comfyui/sdxl" and "no ComfyUI server answered" in r.applied["ran_on"]
    assert r.applied["workflow"]["checkpoint"] == "tiny-shapes.safetensors" and r.images[0].seed == 7
    assert r.cost.status == "priced" and r.cost.units["device"] == "cpu" and r.cost.units["gpu_seconds"] > 0
    img = np.asarray(Image.open(io.BytesIO(r.images[0].data)).convert("RGB"))
    assert score([img], [TRIPLES[1]])["background"] == 1.0


def test_comfyui_convert_prints_diffusers_python_that_runs(tmp_path):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(tiny(caption(*TRIPLES[0]), 3, "dpmpp_2m", "karras")))
    res = runner.invoke(app, ["comfyui", "convert", str(wf)])
    assert res.exit_code == 0, res.output
    code = res.stdout
    assert "AutoPipelineForText2Image.from_pretrained(" in code and "use_karras_sigmas=True" in code
    assert "num_inference_steps=20" in code and "guidance_scale=5.0" in code and "manual_seed(3 + k)" in code
    script = tmp_path / "converted.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    image = Image.open(tmp_path / "node9_00000.png")
    assert image.size == (64, 64)
    assert score([np.asarray(image.convert("RGB"))], [TRIPLES[0]])["background"] == 1.0


def test_comfyui_run_mistakes_exit_2(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    assert runner.invoke(app, ["comfyui", "run", str(tmp_path / "nope.json")]).exit_code == 2
    res = runner.invoke(app, ["comfyui", "run", str(tmp_path / "bad.json")])
    assert res.exit_code == 2 and "not a JSON workflow" in res.output
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(WORKFLOW))   # sd_xl_base: not installed here, and not mapped
    res = runner.invoke(app, ["comfyui", "run", str(wf)])
    assert res.exit_code == 2 and "is not a local model" in res.output and "Traceback" not in res.output
