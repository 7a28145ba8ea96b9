"""ControlNets and IP-Adapters on a loaded model: the ControlNet pipeline for the task, built from the loaded
components, with the request's control images; and the request's image prompts, loaded into the pipeline
for one call and unloaded after it, so the base model afterwards is byte for byte what it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
from PIL import Image as PILImage

from ..errors import ModelNotFound, RequestError
from ..providers.settings import IpAdapterSettings
from ..types import ImageRequest
from .sources import local_path

if TYPE_CHECKING:
    from .pipelines import Loaded

_AUTO = {"text2img": diffusers.AutoPipelineForText2Image, "img2img": diffusers.AutoPipelineForImage2Image,
         "inpaint": diffusers.AutoPipelineForInpainting}


def with_control(loaded: Loaded, task: str, kinds: tuple[str, ...], sources: dict[str, str]) -> Any:
    """The ControlNet pipeline of this model's family for the task (text-to-image, img2img, inpainting)
    with these kinds' ControlNets (several: Diffusers' multi-ControlNet), built from the loaded components:
    no second copy of the base weights, and the base pipeline itself unchanged."""
    if missing := [k for k in kinds if k not in sources]:
        raise RequestError(f"no ControlNet for {', '.join(missing)} on this model")
    key = f"control:{task}:" + ",".join(kinds)
    if key not in loaded.variants:
        nets = [_controlnet(loaded, k, sources[k]) for k in kinds]
        try:
            variant = _AUTO[task].from_pipe(loaded.pipe, controlnet=nets[0] if len(nets) == 1 else nets)
        except ValueError as exc:   # e.g. no ControlNet inpainting pipeline for this family
            raise RequestError(f"control with {task} is not available for a {loaded.family} model: {exc}") from None
        variant.set_progress_bar_config(disable=True)
        loaded.variants[key] = variant
    return loaded.variants[key]


def _controlnet(loaded: Loaded, kind: str, source: str) -> Any:
    if kind not in loaded.controlnets:
        cls = diffusers.FluxControlNetModel if loaded.family == "flux" else diffusers.ControlNetModel
        path, dtype = local_path(source), loaded.pipe.dtype
        try:
            if path.is_file():
                net = cls.from_single_file(str(path), torch_dtype=dtype, local_files_only=True)
            else:
                net = cls.from_pretrained(str(path) if path.is_dir() else source, torch_dtype=dtype,
                                          local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelNotFound(f"ControlNet {kind} {source!r} could not be loaded: {exc}",
                                provider="local") from None
        loaded.controlnets[kind] = net.to(loaded.pipe.device)
    return loaded.controlnets[kind]


def control_inputs(request: ImageRequest, family: str, task: str, size: tuple[int, int]) -> dict[str, Any]:
    """The control images (at the size asked; the pipeline repeats each for every image it makes) and their
    scales and windows, under the names the family's ControlNet pipeline takes (SD's text-to-image one
    calls the control image `image`; its img2img and inpainting ones, and FLUX's, `control_image`); one
    control is passed as one, several as lists (one entry per ControlNet)."""
    images, scales, starts, ends = [], [], [], []
    for c in request.control:
        image = c.image.pil().convert("RGB")
        if image.size != size:
            image = image.resize(size, PILImage.Resampling.BILINEAR)
        images.append(image)
        scales.append(c.scale)
        starts.append(c.start)
        ends.append(c.end)
    one = len(images) == 1
    name = "image" if family != "flux" and task == "text2img" else "control_image"
    return {name: images[0] if one else images,
            "controlnet_conditioning_scale": scales[0] if one else scales,
            "control_guidance_start": starts[0] if one else starts, "control_guidance_end": ends[0] if one else ends}


@contextlib.contextmanager
def image_prompts(loaded: Loaded, pipe: Any, request: ImageRequest, setting: IpAdapterSettings | None
                  ) -> Iterator[dict[str, Any]]:
    """The model's IP-Adapter loaded once per image prompt (each with its own scale), its image encoder
    registered, for one pipeline call; the call's inputs yielded; everything unloaded afterwards."""
    if not request.image_prompts:
        yield {}
        return
    if setting is None:
        raise RequestError("image prompts need an IP-Adapter: declare local.models.NAME.ip_adapter")
    if not hasattr(pipe, "load_ip_adapter"):
        raise RequestError(f"image prompts are not available for a {loaded.family} model's {type(pipe).__name__}")
    weights, encoder = _ip_adapter(loaded, setting)
    count = len(request.image_prompts)
    try:   # from the first change on: a load that fails half-way (a wrong adapter) is undone too
        pipe.register_modules(image_encoder=encoder)
        try:
            pipe.load_ip_adapter([weights] * count, subfolder=[""] * count, weight_name=[""] * count,
                                 image_encoder_folder=None)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelNotFound(f"IP-Adapter {setting.source!r} does not fit this model: {exc}",
                                provider="local") from None
        pipe.set_ip_adapter_scale([p.scale for p in request.image_prompts])
        yield {"ip_adapter_image": [p.image.pil().convert("RGB") for p in request.image_prompts]}
    finally:
        pipe.unload_ip_adapter()


def _ip_adapter(loaded: Loaded, setting: IpAdapterSettings) -> tuple[dict[str, Any], Any]:
    """(the adapter's state dict, its image encoder), read once per loaded model."""
    if loaded.ip_adapter is None:
        import torch
        from diffusers.models.model_loading_utils import load_state_dict
        from transformers import CLIPVisionModelWithProjection

        path = local_path(setting.source)
        local = setting.source.startswith(("/", ".", "~", "builtin:")) or path.suffix in (".safetensors", ".bin")
        try:
            if local and not path.is_file():
                raise OSError(f"no such file {path}")
            file = path if local else _hub_file(setting)
            raw = load_state_dict(str(file))
            weights: dict[str, Any] = raw if "image_proj" in raw else {
                part: {k.removeprefix(part + "."): v for k, v in raw.items() if k.startswith(part + ".")}
                for part in ("image_proj", "ip_adapter")}
            if not weights["image_proj"] or not weights["ip_adapter"]:
                raise ValueError("it has no image_proj and ip_adapter weights")
            enc_path = local_path(setting.image_encoder)
            encoder = CLIPVisionModelWithProjection.from_pretrained(
                str(enc_path) if enc_path.is_dir() else setting.image_encoder, local_files_only=True,
                dtype=loaded.pipe.dtype)
        except (OSError, ValueError) as exc:
            raise ModelNotFound(f"IP-Adapter {setting.source!r} could not be loaded: {exc}",
                                provider="local") from None
        weights = {part: {k: v.to(loaded.pipe.dtype) if isinstance(v, torch.Tensor) else v for k, v in d.items()}
                   for part, d in weights.items()}
        loaded.ip_adapter = (weights, encoder.to(getattr(loaded.pipe, "_execution_device", loaded.pipe.device)))
    return loaded.ip_adapter


def _hub_file(setting: IpAdapterSettings) -> Path:
    from huggingface_hub import hf_hub_download

    if not setting.weight_name:
        raise ValueError("a Hub IP-Adapter needs weight_name (e.g. ip-adapter_sd15.safetensors)")
    return Path(hf_hub_download(setting.source, setting.weight_name, subfolder=setting.subfolder or None,
                                local_files_only=True))
