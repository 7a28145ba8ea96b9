"""ComfyUI's API-format graphs and answers, as pure functions: which node inputs a request's fields bind to,
the graph with them filled in, and what the server's answers say (validation errors, a run's failure, the
images a workflow saved, the server time a run used)."""

from __future__ import annotations

import copy
from typing import Any

from ...types import ImageRequest

SAMPLERS = ("KSampler", "KSamplerAdvanced")
LOADERS = ("CheckpointLoaderSimple", "CheckpointLoader", "UNETLoader", "DiffusersLoader", "LoraLoader", "VAELoader",
           "CLIPLoader", "DualCLIPLoader", "ControlNetLoader")
CONTROL_APPLY = ("ControlNetApplyAdvanced", "ControlNetApply")
# a ControlNet's kind, read from its file name (control_v11p_sd15_canny.pth, diffusers_xl_depth_full, ...)
KIND_WORDS = (("canny", "canny"), ("depth", "depth"), ("openpose", "pose"), ("pose", "pose"), ("lineart", "lineart"),
              ("scribble", "scribble"), ("sketch", "sketch"), ("seg", "segmentation"), ("tile", "tile"),
              ("normal", "normal"))
OOM_WORDS = ("outofmemory", "out of memory", "not enough memory")


def node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 30, node_id)


def infer_bindings(graph: dict[str, Any]) -> dict[str, str]:
    """Follow the sampler's links: positive/negative text encoders, the empty latent, its own seed, steps,
    cfg and denoise; the LoadImage nodes (init image first, then references) and a LoadImageMask."""
    sampler_id = next((k for k, n in graph.items() if n.get("class_type") in SAMPLERS), None)
    out: dict[str, str] = {}
    if sampler_id is not None:
        inputs = graph[sampler_id]["inputs"]
        out = {"seed": f"{sampler_id}.inputs.{'noise_seed' if 'noise_seed' in inputs else 'seed'}",
               "steps": f"{sampler_id}.inputs.steps", "guidance": f"{sampler_id}.inputs.cfg"}
        for key, link in (("prompt", "positive"), ("negative", "negative")):
            if isinstance(inputs.get(link), list):
                out[key] = f"{inputs[link][0]}.inputs.text"
        if isinstance(inputs.get("latent_image"), list):
            node = inputs["latent_image"][0]
            if graph.get(node, {}).get("class_type") == "EmptyLatentImage":
                out |= {"width": f"{node}.inputs.width", "height": f"{node}.inputs.height",
                        "batch": f"{node}.inputs.batch_size"}
        if "denoise" in inputs:
            out["strength"] = f"{sampler_id}.inputs.denoise"
    controls = control_bindings(graph)
    control_loads = {v.partition(".")[0] for k, v in controls.items() if k.count(".") == 1}
    out |= controls
    loads = sorted((k for k, n in graph.items() if n.get("class_type") == "LoadImage" and k not in control_loads),
                   key=node_order)
    init = _encoded_image(graph, sampler_id)
    if init in loads:   # the init image is the one the sampler's latent encodes; the others are references
        loads = [init, *(k for k in loads if k != init)]
    for i, node in enumerate(loads):
        out["image" if i == 0 else f"image_{i + 1}"] = f"{node}.inputs.image"
    mask = next((k for k, n in graph.items() if n.get("class_type") == "LoadImageMask"), None)
    if mask is not None:
        out |= {"mask": f"{mask}.inputs.image", "mask_channel": f"{mask}.inputs.channel"}
    return out


def control_bindings(graph: dict[str, Any]) -> dict[str, str]:
    """For each ControlNetApply(Advanced) node fed by a ControlNetLoader whose file name says its kind and by
    a LoadImage: `control.KIND` (that LoadImage's image), `control.KIND.scale` (strength) and, on the
    advanced node, `control.KIND.start` / `.end` (start_percent / end_percent)."""
    out: dict[str, str] = {}
    for nid in sorted((k for k, n in graph.items() if n.get("class_type") in CONTROL_APPLY), key=node_order):
        inputs = graph[nid].get("inputs") or {}
        net, image = inputs.get("control_net"), inputs.get("image")
        if not (isinstance(net, list) and isinstance(image, list)):
            continue
        loader, load = graph.get(str(net[0]), {}), str(image[0])
        if loader.get("class_type") != "ControlNetLoader" or graph.get(load, {}).get("class_type") != "LoadImage":
            continue
        name = str((loader.get("inputs") or {}).get("control_net_name", "")).lower()
        kind = next((k for word, k in KIND_WORDS if word in name), None)
        if kind is None or f"control.{kind}" in out:
            continue
        out |= {f"control.{kind}": f"{load}.inputs.image", f"control.{kind}.scale": f"{nid}.inputs.strength"}
        if graph[nid]["class_type"] == "ControlNetApplyAdvanced":
            out |= {f"control.{kind}.start": f"{nid}.inputs.start_percent",
                    f"control.{kind}.end": f"{nid}.inputs.end_percent"}
    return out


def _encoded_image(graph: dict[str, Any], sampler_id: str | None) -> str | None:
    """The LoadImage node whose pixels the sampler's latent encodes (through SetLatentNoiseMask), if any."""
    node = sampler_id
    for link in ("latent_image", "samples", "pixels"):
        value = (graph.get(node or "", {}).get("inputs") or {}).get(link)
        if isinstance(value, list) and len(value) == 2:
            node = str(value[0])
            if graph.get(node, {}).get("class_type") == "SetLatentNoiseMask":
                value = graph[node]["inputs"].get("samples")
                node = str(value[0]) if isinstance(value, list) else None
    return node if graph.get(node or "", {}).get("class_type") == "LoadImage" else None


def request_values(request: ImageRequest, size: tuple[int, int], seed: int) -> dict[str, Any]:
    """The request's fields under the binding names (`build_graph`'s values; None leaves the template's)."""
    values = {"prompt": request.prompt, "negative": request.negative_prompt, "seed": seed, "width": size[0],
              "height": size[1], "steps": request.steps, "guidance": request.guidance_scale, "batch": request.n,
              "strength": request.strength}
    for c in request.control:   # the control image itself is uploaded (`control.KIND`)
        values |= {f"control.{c.kind}.scale": c.scale, f"control.{c.kind}.start": c.start,
                   f"control.{c.kind}.end": c.end}
    return values


def build_graph(template: dict[str, Any], bindings: dict[str, str], values: dict[str, Any]) -> dict[str, Any]:
    graph = copy.deepcopy(template)
    for key, value in values.items():
        if value is None or key not in bindings:
            continue
        node, _, path = bindings[key].partition(".")
        target = graph[node]
        *parents, leaf = path.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return graph


def node_errors_text(errors: Any) -> str:
    """Every validation error as `node ID (CLASS): TYPE: MESSAGE (DETAILS)`: ComfyUI puts the value and the
    limit in `message` ("Value 99999 bigger than max of 16384") and often only the input's name in `details`."""
    parts = []
    for node, e in (errors.items() if isinstance(errors, dict) else []):
        for err in e.get("errors", []):
            message, details = err.get("message") or "", err.get("details") or ""
            text = f"{message} ({details})" if message and details and details not in message else message or details
            parts.append(f"node {node} ({e.get('class_type')}): {err.get('type')}: {text}")
    return "; ".join(parts)


def prompt_error_text(body: Any) -> str:
    """A 400 from POST /prompt: its node errors, else its error's message and details (an unknown node's id
    is in `details`: "Node ID '#1'")."""
    if not isinstance(body, dict):
        return str(body)[:300]
    if text := node_errors_text(body.get("node_errors") or {}):
        return text
    error = body.get("error") or {}
    if isinstance(error, str):
        return error
    message, details = error.get("message", ""), error.get("details", "")
    return f"{message} ({details})" if details and details not in message else message or str(body)[:300]


def run_failure(kind: str, data: dict[str, Any]) -> tuple[str, bool] | None:
    """A run's failure, the same from a websocket event or a history message: (one line, whether it is
    worth retrying: out of memory or interrupted); None when the message is no failure."""
    if kind == "execution_error":
        exc_type = str(data.get("exception_type", ""))
        message = str(data.get("exception_message", "")).strip().splitlines()
        first = message[0][:300] if message else ""
        text = f"ComfyUI node {data.get('node_id')} ({data.get('node_type')}): {exc_type}: {first}"
        return text, any(w in f"{exc_type} {first}".lower() for w in OOM_WORDS)
    if kind == "execution_interrupted":
        return f"ComfyUI interrupted the prompt at node {data.get('node_id')} ({data.get('node_type')})", True
    return None


def history_failure(record: dict[str, Any]) -> tuple[str, bool] | None:
    for kind, data in (record.get("status") or {}).get("messages", []):
        if (failure := run_failure(kind, data)) is not None:
            return failure
    return None


def saved_images(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The images the workflow saved (`type: output`, not `temp` previews), by output node id."""
    outputs = record.get("outputs") or {}
    return [img for node in sorted(outputs, key=node_order) for img in outputs[node].get("images", [])
            if isinstance(img, dict) and img.get("type", "output") == "output"]


def server_seconds(record: dict[str, Any], until: str = "execution_success") -> float | None:
    """Seconds from execution_start to `until` (or to the run's failure or interrupt), from the history."""
    stamps = {m[0]: m[1].get("timestamp") for m in (record.get("status") or {}).get("messages", [])
              if isinstance(m, list) and len(m) == 2 and isinstance(m[1], dict)}
    end = stamps.get(until) or stamps.get("execution_error") or stamps.get("execution_interrupted")
    if stamps.get("execution_start") is None or end is None:
        return None
    return max(0.0, (end - stamps["execution_start"]) / 1000)


def cached_nodes(record: dict[str, Any]) -> int:
    for m in (record.get("status") or {}).get("messages", []):
        if m[0] == "execution_cached":
            return len(m[1].get("nodes") or [])
    return 0
