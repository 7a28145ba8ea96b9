"""What the fake ComfyUI server knows of nodes, as ComfyUI 0.8.0 answers (shared research/comfyui-real-server):
each class's inputs with their types and limits, validation with the real error shapes (an unknown class, a
value out of range or of the wrong type, a link of the wrong type, a missing input; outputs that fail
validation are dropped and the rest run), and an executor that makes real pixels without a model.

An image a sampler makes is drawn from its seed and batch index together, as ComfyUI draws one batch's noise
from one seed: batch image 1 of seed 5 is not the lone image of seed 6."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageFilter, ImageOps


@dataclass(frozen=True)
class In:
    type: str                       # INT, FLOAT, STRING, a choice list's name, or a link type (IMAGE, ...)
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    default: Any = None

    def config(self) -> list[Any]:
        opts = {k: v for k, v in (("default", self.default), ("min", self.min), ("max", self.max)) if v is not None}
        return [list(self.choices) if self.choices else self.type, opts]


@dataclass(frozen=True)
class Spec:
    inputs: dict[str, In]
    outputs: tuple[str, ...] = ()
    output_node: bool = False
    optional: frozenset[str] = field(default_factory=frozenset)


LINKS = {"IMAGE", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING", "MASK", "CONTROL_NET"}
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc",
            "lcm")
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta")
CHECKPOINTS = ("sd_xl_base_1.0.safetensors", "flux1-schnell.safetensors", "tiny_sd15_random.safetensors",
               "v1-5-pruned-emaonly.safetensors")
CONTROLNETS = ("control_v11p_sd15_canny.pth", "control_v11f1p_sd15_depth.pth", "diffusers_xl_canny_full.safetensors")
_SIDE = In("INT", 16, 16384, default=512)
_SAMPLER = {"model": In("MODEL"), "positive": In("CONDITIONING"), "negative": In("CONDITIONING"),
            "latent_image": In("LATENT"), "steps": In("INT", 1, 10000, default=20),
            "cfg": In("FLOAT", 0.0, 100.0, default=8.0), "sampler_name": In("COMBO", choices=SAMPLERS),
            "scheduler": In("COMBO", choices=SCHEDULERS)}
NODES: dict[str, Spec] = {
    "EmptyImage": Spec({"width": In("INT", 1, 16384, default=512), "height": In("INT", 1, 16384, default=512),
                        "batch_size": In("INT", 1, 4096, default=1), "color": In("INT", 0, 0xFFFFFF, default=0)},
                       ("IMAGE",)),
    "ImageBlur": Spec({"image": In("IMAGE"), "blur_radius": In("INT", 1, 31, default=1),
                       "sigma": In("FLOAT", 0.1, 10.0, default=1.0)}, ("IMAGE",)),
    "ImageInvert": Spec({"image": In("IMAGE")}, ("IMAGE",)),
    "SaveImage": Spec({"images": In("IMAGE"), "filename_prefix": In("STRING", default="ComfyUI")}, (), True),
    "PreviewImage": Spec({"images": In("IMAGE")}, (), True),
    "CheckpointLoaderSimple": Spec({"ckpt_name": In("COMBO", choices=CHECKPOINTS)}, ("MODEL", "CLIP", "VAE")),
    "LoraLoader": Spec({"model": In("MODEL"), "clip": In("CLIP"), "lora_name": In("STRING"),
                        "strength_model": In("FLOAT", -100, 100, default=1.0),
                        "strength_clip": In("FLOAT", -100, 100, default=1.0)}, ("MODEL", "CLIP")),
    "CLIPTextEncode": Spec({"text": In("STRING"), "clip": In("CLIP")}, ("CONDITIONING",)),
    "EmptyLatentImage": Spec({"width": _SIDE, "height": _SIDE, "batch_size": In("INT", 1, 4096, default=1)},
                             ("LATENT",)),
    "KSampler": Spec({**_SAMPLER, "seed": In("INT", 0, 2**64 - 1, default=0),
                      "denoise": In("FLOAT", 0.0, 1.0, default=1.0)}, ("LATENT",)),
    "KSamplerAdvanced": Spec({**_SAMPLER, "noise_seed": In("INT", 0, 2**64 - 1, default=0),
                              "add_noise": In("COMBO", choices=("enable", "disable")),
                              "start_at_step": In("INT", 0, 10000, default=0),
                              "end_at_step": In("INT", 0, 10000, default=10000),
                              "return_with_leftover_noise": In("COMBO", choices=("disable", "enable"))}, ("LATENT",)),
    "VAEDecode": Spec({"samples": In("LATENT"), "vae": In("VAE")}, ("IMAGE",)),
    "VAEEncode": Spec({"pixels": In("IMAGE"), "vae": In("VAE")}, ("LATENT",)),
    "LoadImage": Spec({"image": In("UPLOAD")}, ("IMAGE", "MASK")),
    "LoadImageMask": Spec({"image": In("UPLOAD"), "channel": In("COMBO", choices=("alpha", "red", "green", "blue"))},
                          ("MASK",)),
    "SetLatentNoiseMask": Spec({"samples": In("LATENT"), "mask": In("MASK")}, ("LATENT",)),
    "ControlNetLoader": Spec({"control_net_name": In("COMBO", choices=CONTROLNETS)}, ("CONTROL_NET",)),
    "ControlNetApplyAdvanced": Spec({"positive": In("CONDITIONING"), "negative": In("CONDITIONING"),
                                     "control_net": In("CONTROL_NET"), "image": In("IMAGE"),
                                     "strength": In("FLOAT", 0.0, 10.0, default=1.0),
                                     "start_percent": In("FLOAT", 0.0, 1.0, default=0.0),
                                     "end_percent": In("FLOAT", 0.0, 1.0, default=1.0), "vae": In("VAE")},
                                    ("CONDITIONING", "CONDITIONING"), optional=frozenset({"vae"})),
}


class GraphError(Exception):
    """A 400 answer to POST /prompt: its body."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


def _error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _check_value(name: str, spec: In, value: Any, uploads: dict[str, bytes]) -> dict[str, Any] | None:
    info = {"input_name": name, "input_config": spec.config(), "received_value": value}
    if spec.type in ("INT", "FLOAT"):
        try:
            number = int(value) if spec.type == "INT" else float(value)
        except (TypeError, ValueError):
            return _error("invalid_input_type", f"Failed to convert an input value to a {spec.type} value",
                          f"{name}, {value}, invalid literal for int() with base 10: {value!r}", **info)
        if spec.max is not None and number > spec.max:
            return _error("value_bigger_than_max", f"Value {value} bigger than max of {spec.max:g}", name, **info)
        if spec.min is not None and number < spec.min:
            return _error("value_smaller_than_min", f"Value {value} smaller than min of {spec.min:g}", name, **info)
    elif spec.choices and value not in spec.choices:
        return _error("value_not_in_list", "Value not in list",
                      f"{name}: '{value}' not in (list of length {len(spec.choices)})", **info)
    elif spec.type == "UPLOAD" and value not in uploads:
        return _error("custom_validation_failed", "Custom validation failed for node",
                      f"image - Invalid image file: {value}", **info)
    return None


def validate(graph: Any, uploads: dict[str, bytes]) -> tuple[list[str], dict[str, Any]]:
    """(the output nodes that will run, the node_errors of those that will not); GraphError for a 400."""
    if not isinstance(graph, dict):
        raise GraphError({"error": _error("no_prompt", "No prompt provided", "No prompt provided"), "node_errors": {}})
    for nid, node in graph.items():
        cls = node.get("class_type") if isinstance(node, dict) else None
        if cls not in NODES:
            raise GraphError({"error": _error("invalid_prompt", f"Cannot execute because node {cls} does not exist.",
                                              f"Node ID '#{nid}'"), "node_errors": {}})
    outputs = [nid for nid, node in graph.items() if NODES[node["class_type"]].output_node]
    if not outputs:
        raise GraphError({"error": _error("prompt_no_outputs", "Prompt has no outputs"), "node_errors": []})
    errors: dict[str, list[dict[str, Any]]] = {}
    for nid, node in graph.items():
        spec, given = NODES[node["class_type"]], node.get("inputs", {})
        for name, want in spec.inputs.items():
            if name not in given:
                if name not in spec.optional:
                    errors.setdefault(nid, []).append(_error("required_input_missing", "Required input is missing",
                                                             name, input_name=name))
                continue
            value = given[name]
            if want.type in LINKS:
                up = graph.get(str(value[0])) if isinstance(value, list) and len(value) == 2 else None
                got = NODES[up["class_type"]].outputs[value[1]] if up and value[1] < len(
                    NODES[up["class_type"]].outputs) else None
                if got != want.type:
                    errors.setdefault(nid, []).append(_error(
                        "return_type_mismatch", "Return type mismatch between linked nodes",
                        f"{name}, received_type({got}) mismatch input_type({want.type})", input_name=name,
                        linked_node=value))
            elif (problem := _check_value(name, want, value, uploads)) is not None:
                errors.setdefault(nid, []).append(problem)
    good, node_errors = [], {}
    for out in outputs:
        bad = sorted(upstream(graph, out) & set(errors))
        if not bad:
            good.append(out)
        for nid in bad:
            entry = node_errors.setdefault(nid, {"errors": errors[nid], "dependent_outputs": [],
                                                 "class_type": graph[nid]["class_type"]})
            entry["dependent_outputs"].append(out)
    if not good:
        details = next((e["details"] for es in errors.values() for e in es
                        if e["type"] == "return_type_mismatch"), "")
        raise GraphError({"error": _error("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                                          details), "node_errors": node_errors})
    return good, node_errors


def upstream(graph: dict[str, Any], nid: str) -> set[str]:
    """The node and every node it reads from."""
    seen, todo = set(), [nid]
    while todo:
        cur = todo.pop()
        if cur in seen or cur not in graph:
            continue
        seen.add(cur)
        todo += [str(v[0]) for v in graph[cur].get("inputs", {}).values() if isinstance(v, list) and len(v) == 2]
    return seen


def order(graph: dict[str, Any], outputs: list[str]) -> list[str]:
    """The nodes the outputs need, each after the nodes it reads from (ComfyUI's own order: depth first)."""
    done: list[str] = []

    def visit(nid: str) -> None:
        if nid in done:
            return
        for v in graph[nid].get("inputs", {}).values():
            if isinstance(v, list) and len(v) == 2:
                visit(str(v[0]))
        done.append(nid)

    for out in outputs:
        visit(out)
    return done


def signature(graph: dict[str, Any], nid: str) -> str:
    """What a node computes, for ComfyUI's cache: its class and inputs, its links by their own signatures."""
    node = graph[nid]
    inputs = {k: (signature(graph, str(v[0])), v[1]) if isinstance(v, list) and len(v) == 2 else v
              for k, v in sorted(node.get("inputs", {}).items())}
    return hashlib.sha256(json.dumps([node["class_type"], inputs], sort_keys=True, default=str).encode()).hexdigest()


class NodeFailed(Exception):
    """A node raised while running: the execution_error's exception_type and message."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


def run_node(cls: str, inputs: dict[str, Any], uploads: dict[str, bytes]) -> tuple[Any, ...]:
    """One node's outputs from its (resolved) inputs. Images are lists of PIL images; a latent is a dict."""
    if cls == "EmptyImage":
        c = int(inputs["color"])
        return ([Image.new("RGB", (int(inputs["width"]), int(inputs["height"])), (c >> 16, (c >> 8) & 255, c & 255))
                 for _ in range(int(inputs["batch_size"]))],)
    if cls == "ImageBlur":
        images, radius = inputs["image"], int(inputs["blur_radius"])
        if any(radius >= min(i.size) for i in images):
            w, h = images[0].size
            raise NodeFailed("RuntimeError", f"Argument #4: Padding size should be less than the corresponding "
                                             f"input dimension, but got: padding ({radius}, {radius}) at dimension 3 "
                                             f"of input [1, 3, {h}, {w}]\n")
        return ([i.filter(ImageFilter.GaussianBlur(float(inputs["sigma"]))) for i in images],)
    if cls == "ImageInvert":
        return ([ImageOps.invert(i.convert("RGB")) for i in inputs["image"]],)
    if cls == "CheckpointLoaderSimple":
        return (f"model:{inputs['ckpt_name']}", f"clip:{inputs['ckpt_name']}", f"vae:{inputs['ckpt_name']}")
    if cls == "LoraLoader":
        return (f"{inputs['model']}+{inputs['lora_name']}", inputs["clip"])
    if cls == "CLIPTextEncode":
        return (str(inputs["text"]),)
    if cls == "EmptyLatentImage":
        return ({"width": int(inputs["width"]), "height": int(inputs["height"]), "batch": int(inputs["batch_size"])},)
    if cls in ("KSampler", "KSamplerAdvanced"):
        latent = dict(inputs["latent_image"])
        latent["seed"] = int(inputs.get("seed", inputs.get("noise_seed", 0)))
        latent["prompt"] = inputs["positive"]
        latent["denoise"] = float(inputs.get("denoise", 1.0))
        return (latent,)
    if cls == "VAEDecode":
        return (decode(inputs["samples"]),)
    if cls == "VAEEncode":
        images = inputs["pixels"]
        return ({"width": images[0].width, "height": images[0].height, "batch": len(images), "init": images},)
    if cls == "LoadImage":
        image = Image.open(io.BytesIO(uploads[inputs["image"]]))
        alpha = image.getchannel("A") if "A" in image.getbands() else Image.new("L", (64, 64), 255)
        return ([image.convert("RGB")], ImageOps.invert(alpha))   # MASK = 1 - alpha (64x64 zeros without alpha)
    if cls == "LoadImageMask":
        image = Image.open(io.BytesIO(uploads[inputs["image"]]))
        channel = {"alpha": "A", "red": "R", "green": "G", "blue": "B"}[inputs["channel"]]
        band = image.convert("RGBA").getchannel(channel)
        return (ImageOps.invert(band) if channel == "A" else band,)
    if cls in ("SaveImage", "PreviewImage"):   # the server writes their files
        return ()
    if cls == "ControlNetLoader":
        return (f"controlnet:{inputs['control_net_name']}",)
    if cls == "ControlNetApplyAdvanced":   # the conditioning carries the control: the sampled image depends on it
        pixels = hashlib.sha256(inputs["image"][0].tobytes()).hexdigest()[:16]
        held = f"{inputs['control_net']}:{pixels}:{float(inputs['strength']):g}:{float(inputs['start_percent']):g}"
        return (f"{inputs['positive']}|{held}", f"{inputs['negative']}|{held}")
    if cls == "SetLatentNoiseMask":
        return ({**inputs["samples"], "mask": inputs["mask"]},)
    raise NodeFailed("NotImplementedError", f"the fake cannot run {cls}")


def decode(latent: dict[str, Any]) -> list[Image.Image]:
    """Pixels from a sampled latent: a flat colour from (seed, batch index, prompt), blended into the init
    image by the denoise where there is one (and only inside the noise mask)."""
    out = []
    for k in range(latent["batch"]):
        digest = hashlib.sha256(f"{latent.get('seed')}:{k}:{latent.get('prompt')}".encode()).digest()
        image = Image.new("RGB", (latent["width"], latent["height"]), tuple(digest[:3]))
        init = latent.get("init")
        if init:
            base = init[min(k, len(init) - 1)].convert("RGB").resize(image.size)
            image = Image.blend(base, image, float(latent.get("denoise", 1.0)))
            if latent.get("mask") is not None:
                image = Image.composite(image, base, latent["mask"].resize(image.size))
        out.append(image)
    return out


# -- workflows the tests send (API format) ---------------------------------------------------------
WORKFLOW = {  # a minimal SD text-to-image graph in API format
    "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                              "scheduler": "normal", "denoise": 1, "model": ["4", 0],
                                              "positive": ["6", 0], "negative": ["7", 0],
                                              "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "positive", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "negative", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}
# img2img: the uploaded image encoded as the latent, denoised by `denoise`; inpainting adds a mask
# (LoadImageMask, channel red: white = change) on the latent
WORKFLOW_IMG2IMG = {k: v for k, v in WORKFLOW.items() if k != "5"} | {
    "3": {"class_type": "KSampler", "inputs": {**WORKFLOW["3"]["inputs"], "denoise": 0.75, "latent_image": ["11", 0]}},
    "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
}
WORKFLOW_INPAINT = WORKFLOW_IMG2IMG | {
    "3": {"class_type": "KSampler", "inputs": {**WORKFLOW_IMG2IMG["3"]["inputs"], "denoise": 1.0,
                                              "latent_image": ["13", 0]}},
    "12": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
    "13": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["12", 0]}},
}
# structural control: a canny ControlNet applied to both conditionings, its image from a LoadImage
WORKFLOW_CONTROL = WORKFLOW | {
    "3": {"class_type": "KSampler", "inputs": {**WORKFLOW["3"]["inputs"], "positive": ["12", 0],
                                              "negative": ["12", 1]}},
    "10": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "diffusers_xl_canny_full.safetensors"}},
    "11": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "12": {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["10", 0], "image": ["11", 0], "strength": 1.0,
        "start_percent": 0.0, "end_percent": 1.0}},
}
