"""An API-format ComfyUI workflow as the requests the local backend runs, with no server: each SaveImage
output becomes one pipeline call, found by following its links back through the standard nodes.

    SaveImage <- VAEDecode <- KSampler | KSamplerAdvanced
                                 model        <- CheckpointLoaderSimple (ckpt_name: a local model) [<- LoraLoader ...]
                                 positive     <- CLIPTextEncode (text)
                                 negative     <- CLIPTextEncode (text)
                                 latent_image <- EmptyLatentImage (width, height, batch_size)
                                               | VAEEncode <- LoadImage                        (img2img, denoise)
                                               | SetLatentNoiseMask <- VAEEncode, LoadImageMask (inpainting)

The sampler's `sampler_name` and `scheduler` map onto the Diffusers schedulers (`SAMPLERS`, `SCHEDULES`). A node
outside this set, or a link the shapes above do not have, is a `WorkflowError` naming the first such node.
Pure: no torch, no IO but reading the input images a LoadImage names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import RequestError
from ..schedulers import SCHEDULES

# ComfyUI's sampler names -> the local backend's scheduler names
SAMPLERS = {"euler": "euler", "euler_ancestral": "euler_a", "heun": "heun", "dpm_2": "dpm2",
            "dpm_2_ancestral": "dpm2_a", "dpmpp_2m": "dpmpp_2m", "dpmpp_2m_sde": "dpmpp_2m_sde",
            "dpmpp_sde": "dpmpp_sde", "ddim": "ddim", "uni_pc": "unipc", "lcm": "lcm", "lms": "lms", "deis": "deis",
            "ddpm": "ddpm"}
SUPPORTED = ("SaveImage", "VAEDecode", "KSampler", "KSamplerAdvanced", "CheckpointLoaderSimple", "LoraLoader",
             "CLIPTextEncode", "EmptyLatentImage", "VAEEncode", "LoadImage", "LoadImageMask", "SetLatentNoiseMask",
             "PreviewImage")


class WorkflowError(RequestError):
    """A workflow the local backend cannot run: names the node and what it would need."""


@dataclass(frozen=True)
class Job:
    """One SaveImage output as a request: its fields for `ImageRequest`, the checkpoint it names, and what
    the workflow set (for the output's `applied`)."""

    node: str
    checkpoint: str
    fields: dict[str, Any]
    workflow: dict[str, Any] = field(default_factory=dict)


def scheduler_name(sampler: str, schedule: str, node: str) -> str:
    """`euler` + `karras` -> `euler+karras`: the local backend's scheduler for ComfyUI's pair."""
    base = SAMPLERS.get(sampler)
    if base is None:
        raise WorkflowError(f"node {node}: sampler_name {sampler!r} has no local equivalent "
                            f"(known: {', '.join(sorted(SAMPLERS))})")
    if schedule not in ("normal", *SCHEDULES):
        raise WorkflowError(f"node {node}: scheduler {schedule!r} has no local equivalent "
                            f"(known: normal, {', '.join(sorted(SCHEDULES))})")
    return base if schedule == "normal" else f"{base}+{schedule}"   # the planner checks it fits the model


def compile_workflow(graph: dict[str, Any], input_dir: Path | None = None,
                     inputs: dict[str, Any] | None = None) -> list[Job]:
    """Every SaveImage output of the workflow as a Job (WorkflowError for what cannot run locally). A
    LoadImage's image is `inputs[name]` when given, else the file of that name in `input_dir`."""
    if not isinstance(graph, dict) or not graph:
        raise WorkflowError("not an API-format workflow (a JSON object of nodes; export with Export (API))")
    for nid in sorted(graph, key=lambda k: (len(k), k)):
        cls = graph[nid].get("class_type") if isinstance(graph[nid], dict) else None
        if cls not in SUPPORTED:
            raise WorkflowError(f"node {nid} ({cls}) cannot run on the local backend; it runs "
                                f"{', '.join(s for s in SUPPORTED if s != 'PreviewImage')}")
    saves = [nid for nid, n in graph.items() if n["class_type"] == "SaveImage"]
    if not saves:
        raise WorkflowError("the workflow saves no image: add a SaveImage node")
    return [_job(graph, nid, input_dir, inputs or {}) for nid in sorted(saves, key=lambda k: (len(k), k))]


def _linked(graph: dict[str, Any], nid: str, name: str, want: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    value = graph[nid]["inputs"].get(name)
    if not (isinstance(value, list) and len(value) == 2 and str(value[0]) in graph):
        raise WorkflowError(f"node {nid} ({graph[nid]['class_type']}): input {name} is not linked to a node")
    up = str(value[0])
    if graph[up]["class_type"] not in want:
        raise WorkflowError(f"node {up} ({graph[up]['class_type']}) feeds {name} of node {nid}: the local backend "
                            f"takes {' or '.join(want)} there")
    return up, graph[up]


def _job(graph: dict[str, Any], save: str, input_dir: Path | None, inputs: dict[str, Any]) -> Job:
    did, _ = _linked(graph, save, "images", ("VAEDecode",))
    sid, sampler = _linked(graph, did, "samples", ("KSampler", "KSamplerAdvanced"))
    s = sampler["inputs"]
    advanced = sampler["class_type"] == "KSamplerAdvanced"
    steps = int(s.get("steps", 20))
    if advanced and (int(s.get("start_at_step", 0)) > 0 or int(s.get("end_at_step", 10000)) < steps):
        raise WorkflowError(f"node {sid} (KSamplerAdvanced): start_at_step/end_at_step other than the whole "
                            "range cannot run locally")
    fields: dict[str, Any] = {
        "prompt": _text(graph, sid, "positive"), "negative_prompt": _text(graph, sid, "negative") or None,
        "seed": int(s.get("noise_seed" if advanced else "seed", 0)), "steps": steps,
        "guidance_scale": float(s.get("cfg", 8.0)),
        "scheduler": scheduler_name(str(s.get("sampler_name", "euler")), str(s.get("scheduler", "normal")), sid)}
    checkpoint, adapters = _model(graph, sid)
    if adapters:
        fields["adapters"] = adapters
    lid, latent = _linked(graph, sid, "latent_image", ("EmptyLatentImage", "VAEEncode", "SetLatentNoiseMask"))
    if latent["class_type"] == "EmptyLatentImage":
        li = latent["inputs"]
        fields |= {"width": int(li["width"]), "height": int(li["height"]), "n": int(li.get("batch_size", 1))}
        if float(s.get("denoise", 1.0)) != 1.0:
            raise WorkflowError(f"node {sid}: denoise {s.get('denoise')} on an empty latent does nothing locally "
                                "(give 1.0, or encode an image with VAEEncode)")
    else:
        encode_id = lid if latent["class_type"] == "VAEEncode" else _linked(graph, lid, "samples", ("VAEEncode",))[0]
        fields["images"] = [_input_file(graph, _linked(graph, encode_id, "pixels", ("LoadImage",))[0], input_dir,
                                        inputs)]
        if latent["class_type"] == "SetLatentNoiseMask":
            mid, mask = _linked(graph, lid, "mask", ("LoadImageMask",))
            if mask["inputs"].get("channel", "red") == "alpha":
                raise WorkflowError(f"node {mid} (LoadImageMask): channel alpha: give a white-is-change mask "
                                    "(channel red, green or blue)")
            fields["mask"] = _input_file(graph, mid, input_dir, inputs)
        denoise = float(s.get("denoise", 1.0))
        if denoise <= 0:
            raise WorkflowError(f"node {sid}: denoise {denoise:g} changes nothing: give 0 < denoise <= 1")
        fields["strength"] = denoise
    shown = {"sampler_name": s.get("sampler_name"), "scheduler": s.get("scheduler"), "cfg": s.get("cfg"),
             "steps": steps, "seed": fields["seed"], "checkpoint": checkpoint, "sampler_node": sid}
    return Job(save, checkpoint, fields, shown)


def _text(graph: dict[str, Any], sid: str, name: str) -> str:
    _, node = _linked(graph, sid, name, ("CLIPTextEncode",))
    return str(node["inputs"].get("text", ""))


def _model(graph: dict[str, Any], sid: str) -> tuple[str, tuple[dict[str, Any], ...]]:
    """The checkpoint the sampler's model comes from, and the LoRAs on the way (outermost last)."""
    adapters: list[dict[str, Any]] = []
    nid, node = _linked(graph, sid, "model", ("CheckpointLoaderSimple", "LoraLoader"))
    seen = {sid}
    while node["class_type"] == "LoraLoader":
        if nid in seen:
            raise WorkflowError(f"node {nid} (LoraLoader): its model links loop back to itself")
        seen.add(nid)
        adapters.insert(0, {"ref": str(node["inputs"]["lora_name"]),
                            "scale": float(node["inputs"].get("strength_model", 1.0))})
        nid, node = _linked(graph, nid, "model", ("CheckpointLoaderSimple", "LoraLoader"))
    return str(node["inputs"]["ckpt_name"]), tuple(adapters)


def _input_file(graph: dict[str, Any], nid: str, input_dir: Path | None, inputs: dict[str, Any]) -> Any:
    name = str(graph[nid]["inputs"].get("image", ""))
    if name in inputs:
        return inputs[name]
    path = (input_dir or Path(".")) / name
    if not path.is_file():
        raise WorkflowError(f"node {nid} ({graph[nid]['class_type']}): image {name!r} not found in "
                            f"{input_dir or Path('.')} (the folder of ComfyUI's input images)")
    return path


def checkpoint_offering(checkpoint: str, local_ids: list[str], mapping: dict[str, str]) -> str:
    """The local offering (one of `local_ids`) a checkpoint name stands for: a mapping in the policy
    (`providers.comfyui.options.checkpoints`), else the local model of that name (file suffix ignored)."""
    if checkpoint in mapping:
        if mapping[checkpoint] not in local_ids:
            known = ", ".join(sorted(local_ids))
            raise WorkflowError(f"providers.comfyui.options.checkpoints maps {checkpoint!r} to "
                                f"{mapping[checkpoint]!r}, not a local offering (local: {known})")
        return mapping[checkpoint]
    stem = checkpoint.rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".ckpt", ".pt", ".bin", ".gguf"):
        stem = stem.removesuffix(suffix)
    if f"local/{stem}" in local_ids:
        return f"local/{stem}"
    names = ", ".join(sorted(i.removeprefix("local/") for i in local_ids))
    raise WorkflowError(f"CheckpointLoaderSimple: ckpt_name {checkpoint!r} is not a local model: name one of "
                        f"{names}, or map it in providers.comfyui.options.checkpoints")
