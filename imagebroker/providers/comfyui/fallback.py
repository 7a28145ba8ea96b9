"""A comfyui offering's workflow on the local backend when no server answers (`options.local_fallback`): the
workflow, with the request bound in, compiled (`compile.py`) and run by the broker's own local provider."""

from __future__ import annotations

import secrets
from typing import Any

from ...errors import ProviderError, RequestError
from ...types import ImageRequest
from ..base import CallContext, Provider, ProviderResult
from ..catalog import Catalog
from ..offering import Offering, request_size
from .compile import checkpoint_offering, compile_workflow
from .graph import build_graph, request_values


def missing_inputs(request: ImageRequest, bindings: dict[str, str], where: dict[str, Any]) -> list[str]:
    """The bindings an edit's images take (`image`, `image_2`, ...); an error names those the workflow lacks."""
    names = ["image", *(f"image_{i + 1}" for i in range(1, len(request.images)))]
    missing = [n for n in names + (["mask"] if request.mask else []) if n not in bindings]
    if missing:
        raise ProviderError(f"the workflow has no node for {', '.join(missing)} (LoadImage for images, "
                            "LoadImageMask for the mask): add one, or bind it in providers.comfyui.options.bindings",
                            **where)
    return names


def missing_controls(request: ImageRequest, bindings: dict[str, str], where: dict[str, Any]) -> None:
    """An error naming the control kinds the workflow has no ControlNet node for."""
    if missing := [c.kind for c in request.control if f"control.{c.kind}" not in bindings]:
        raise ProviderError(f"the workflow has no ControlNet for {', '.join(missing)} (a ControlNetApplyAdvanced fed "
                            "by a LoadImage and a ControlNetLoader whose file name says the kind): add one, or bind "
                            f"control.{missing[0]} in providers.comfyui.options.bindings", **where)


async def run_locally(local: Provider, catalog: Catalog, options: dict[str, Any], request: ImageRequest,
                      offering: Offering, template: dict[str, Any], bindings: dict[str, str], ctx: CallContext,
                      where: dict[str, Any]) -> ProviderResult:
    """No server answered and the offering says `local_fallback`: the same workflow, with the request
    bound in, run by the local backend (`compile.py`); its GPU-seconds are this attempt's cost."""
    w, h = request_size(request, offering)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    # the inputs go to the compiler by name, not through an upload: image -> input-0, image_2 -> input-1, ...
    images = {"image" if i == 0 else f"image_{i + 1}": f"input-{i}" for i in range(len(request.images))}
    masks = {"mask": "mask", "mask_channel": "red"} if request.mask else {}
    values = request_values(request, (w, h), seed) | images | masks
    inputs: dict[str, Any] = {f"input-{i}": img.data for i, img in enumerate(request.images)} | {"mask": request.mask}
    try:
        if request.is_edit:
            missing_inputs(request, bindings, where)
        jobs = compile_workflow(build_graph(template, bindings, values), inputs=inputs)
        local_ids = [o.id for o in catalog if o.provider == "local"]
        mapping = dict(options.get("checkpoints") or {})
        targets = [catalog.offerings[checkpoint_offering(j.checkpoint, local_ids, mapping)] for j in jobs]
        subs = [ImageRequest(**job.fields, model=t.id) for job, t in zip(jobs, targets, strict=True)]
    except RequestError as exc:
        raise ProviderError(f"no ComfyUI server answered, and the workflow cannot run locally: {exc}",
                            **where) from None
    for target in targets:
        if why := local.availability(target):
            raise ProviderError(f"no ComfyUI server answered, and {target.id} cannot run: {why}", **where)
    images, usage, applied = [], {"images": 0, "gpu_seconds": 0.0, "width": w, "height": h}, {}
    for job, target, sub_request in zip(jobs, targets, subs, strict=True):
        result = await local.generate(sub_request, target, ctx)
        images += result.images
        usage |= {k: v for k, v in result.usage.items() if k not in ("images", "gpu_seconds")}
        usage["images"] += len(result.images)
        usage["gpu_seconds"] = round(usage["gpu_seconds"] + float(result.usage.get("gpu_seconds", 0)), 6)
        applied = {**result.applied, "workflow": job.workflow}
    applied["ran_on"] = "the local backend: no ComfyUI server answered (options.local_fallback)"
    return ProviderResult(images, usage, None, applied)
