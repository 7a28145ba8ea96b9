"""Running one batch of requests through a Diffusers pipeline on one device: the pipelines kept loaded,
their adapters and schedulers, per-image seeds, and the busy seconds measured around the pipeline call.

Shared by both engines: the in-process one (`runner.py`: a worker thread, coalescing from a queue) and
the Ray Serve one (`ray_serve.py`: a replica, coalescing with `@serve.batch`). The only modules besides
those that import torch and diffusers are this one and `loading.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "requires torchvision" notes at import
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import diffusers
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image as PILImage

from ..errors import ModelNotFound, ProviderError, ProviderUnavailable, RequestError
from ..inputs import mask_image
from ..providers.base import CallContext, ProviderResult, RawImage
from ..providers.offering import Offering, request_size
from ..providers.settings import IpAdapterSettings, LocalSettings
from ..types import Adapter, ImageRequest
from . import control, schedulers
from .loading import load_pipeline, pipeline_bytes

diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()
DEFAULT_STEPS = 25


@dataclass
class Loaded:
    pipe: Any
    family: str
    base_config: Any
    default_scheduler: str
    bytes: int
    multiple: int
    adapters: set[str] = field(default_factory=set)
    variants: dict[str, Any] = field(default_factory=dict)   # img2img / inpaint, sharing pipe's components
    controlnets: dict[str, Any] = field(default_factory=dict)   # by kind, loaded on first use
    ip_adapter: Any = None   # (its weights, its image encoder), read on first use (`control.py`)

    def for_task(self, task: str) -> Any:
        """The pipeline for `text2img`, `img2img` or `inpaint`: the loaded one, or one built from its
        components (`from_pipe`: no second load, no second copy of the weights)."""
        if task == "text2img":
            return self.pipe
        if task not in self.variants:
            auto = diffusers.AutoPipelineForInpainting if task == "inpaint" else diffusers.AutoPipelineForImage2Image
            variant = auto.from_pipe(self.pipe)
            variant.set_progress_bar_config(disable=True)
            self.variants[task] = variant
        return self.variants[task]


@dataclass
class Job:
    request: ImageRequest
    offering: Offering
    ctx: CallContext
    loop: asyncio.AbstractEventLoop | None = None     # where the waiting caller's future lives
    future: asyncio.Future[ProviderResult] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys run as one batch: the same model, settings and input images."""
        r = self.request
        inputs = (tuple(i.sha256 for i in r.images), r.mask.sha256 if r.mask else None, r.strength)
        control = tuple(c.key() for c in r.control), tuple(p.key() for p in r.image_prompts)
        return (self.offering.id, request_size(r, self.offering), r.steps, r.guidance_scale,
                r.scheduler, r.adapters, inputs, control)

    def resolve(self, result: ProviderResult | None, error: BaseException | None = None) -> None:
        future, loop = self.future, self.loop
        if future is None or loop is None:
            return

        def done() -> None:
            if future.done() or (error is not None and self.cancelled.is_set()):
                return  # nobody is waiting for it any more
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]
        loop.call_soon_threadsafe(done)


def pick_device(kind: str) -> str:
    if kind == "cuda" and torch.cuda.is_available():
        return "cuda"
    if kind == "mps" and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class Pipelines:
    """The pipelines loaded on one device and the one batch at a time they run. Not thread-safe: one
    caller (the worker thread, or the replica's run lock) at a time."""

    def __init__(self, settings: LocalSettings, device_kind: str) -> None:
        self.settings = settings
        self.device = pick_device(device_kind)
        self.cache: OrderedDict[str, Loaded] = OrderedDict()
        self.generation = 0  # bumped whenever a pipeline is loaded or dropped (the planner's warmth)

    def is_loaded(self, offering: Offering) -> bool:
        return offering.id in self.cache

    def clear(self) -> None:
        self.cache.clear()
        self.generation += 1

    # -- loading ----------------------------------------------------------------------------
    def load(self, offering: Offering) -> tuple[Loaded, float]:
        if offering.id in self.cache:
            self.cache.move_to_end(offering.id)
            return self.cache[offering.id], 0.0
        t0 = time.perf_counter()
        pipe, family = load_pipeline(offering, self.settings, self.device)
        sched = pipe.scheduler
        if family in ("sd", "sdxl"):
            multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        else:
            multiple = pipe.vae_scale_factor * 2
        loaded = Loaded(pipe, family, sched.config, type(sched).__name__, pipeline_bytes(pipe), multiple)
        self.cache[offering.id] = loaded
        self._evict()
        self.generation += 1
        return loaded, time.perf_counter() - t0

    def _evict(self) -> None:
        limit = self.settings.cache.max_memory_gb
        while len(self.cache) > self.settings.cache.max_models or (
                limit and len(self.cache) > 1 and sum(x.bytes for x in self.cache.values()) > limit * 2**30):
            self.cache.popitem(last=False)
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def _adapters(self, loaded: Loaded, adapters: tuple[Adapter, ...]) -> None:
        pipe = loaded.pipe
        if not adapters:
            if loaded.adapters:
                pipe.disable_lora()  # cached for next time; the base model is untouched
            return
        names = []
        for a in adapters:
            name = "lora_" + hashlib.sha1(a.ref.encode()).hexdigest()[:12]
            if name not in loaded.adapters:
                path = Path(a.ref).expanduser()
                try:
                    if path.is_file():
                        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
                    elif path.is_dir():
                        pipe.load_lora_weights(str(path), adapter_name=name)
                    else:
                        pipe.load_lora_weights(a.ref, adapter_name=name, local_files_only=True)
                except (OSError, ValueError) as exc:
                    raise ModelNotFound(f"adapter {a.ref!r} could not be loaded: {exc}",
                                        provider="local") from None
                loaded.adapters.add(name)
            names.append(name)
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[a.scale for a in adapters])

    # -- one batch --------------------------------------------------------------------------
    def run(self, batch: list[Job]) -> list[ProviderResult]:
        first = batch[0]
        offering, req = first.offering, first.request
        loaded, load_s = self.load(offering)
        task = "inpaint" if req.mask is not None else "img2img" if req.is_edit else "text2img"
        if req.control:
            sources = dict(offering.settings.get("controlnets") or {})  # type: ignore[call-overload]
            pipe = control.with_control(loaded, task, tuple(c.kind for c in req.control), sources)
        else:
            pipe = loaded.for_task(task)
        family = loaded.family
        w, h = request_size(req, offering)
        if w % loaded.multiple or h % loaded.multiple:
            raise RequestError(f"size {w}x{h}: {offering.id} needs both sides to be multiples of "
                               f"{loaded.multiple}")
        s = offering.settings
        steps = req.steps or int(s.get("steps") or DEFAULT_STEPS)  # type: ignore[call-overload]
        guidance = req.guidance_scale if req.guidance_scale is not None else s.get("guidance_scale")
        sched_name = req.scheduler or s.get("scheduler")
        if sched_name:
            if why := schedulers.problem(str(sched_name), family):
                raise RequestError(why)
            pipe.scheduler = schedulers.build(str(sched_name), family, loaded.base_config)
        else:  # a fresh default scheduler: they keep per-call state
            pipe.scheduler = getattr(diffusers, loaded.default_scheduler).from_config(loaded.base_config)
        self._adapters(loaded, req.adapters)

        seeds: list[list[int]] = []
        prompts, negatives, generators = [], [], []
        for j in batch:
            base = j.request.seed if j.request.seed is not None else secrets.randbelow(2**31)
            seeds.append([base + i for i in range(j.request.n)])
            for sd in seeds[-1]:
                prompts.append(j.request.prompt)
                negatives.append(j.request.negative_prompt or "")
                generators.append(torch.Generator("cpu").manual_seed(sd))
        calls = [0]

        def on_step(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            calls[0] += 1
            total = len(p.scheduler.timesteps)
            for j in batch:
                if j.ctx.progress is not None:
                    j.ctx.progress(i + 1, total)
            if all(j.cancelled.is_set() for j in batch):
                p._interrupt = True
            return kw

        kwargs: dict[str, Any] = dict(prompt=prompts, height=h, width=w, num_inference_steps=steps,
                                      generator=generators, output_type="pil",
                                      callback_on_step_end=on_step)
        if req.control:
            kwargs |= control.control_inputs(req, family, task, (w, h))
        if task != "text2img":
            kwargs |= _edit_inputs(req, task, (w, h), len(prompts))
            if task == "img2img" and "height" not in inspect.signature(pipe.__call__).parameters:
                del kwargs["height"], kwargs["width"]   # SD's makes the init image's size (resized to the size asked)
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)  # type: ignore[arg-type]
        if family != "flux" and any(negatives):
            kwargs["negative_prompt"] = negatives
        energy = _EnergyMeter(self.device, self.settings.energy_usd_per_kwh is not None)
        if self.device == "cuda":
            torch.cuda.synchronize()
        ip = offering.settings.get("ip_adapter")
        with control.image_prompts(loaded, pipe, req, IpAdapterSettings(**ip) if ip else None) as extra:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = pipe(**kwargs, **extra)
            if self.device == "cuda":
                torch.cuda.synchronize()
            busy = time.perf_counter() - t0
        joules = energy.joules()
        if all(j.cancelled.is_set() for j in batch):
            raise ProviderUnavailable("cancelled: the pipeline was interrupted", provider="local")
        images = out.images
        if task == "inpaint":   # outside the mask, the init image's own pixels (Diffusers' apply_overlay)
            init, mask = kwargs["image"][0], kwargs["mask_image"][0]
            images = [PILImage.composite(image, init, mask) for image in images]
        results = self._results(batch, images, seeds, busy, load_s, steps, guidance, sched_name,
                                calls[0], (w, h))
        if task != "text2img":
            for r in results:
                r.applied |= {"task": task, "strength": req.edit_strength,
                              "images": [i.describe() for i in req.images],
                              "mask": req.mask.describe() if req.mask else None}
        if joules is not None:
            for r in results:
                r.usage["energy_j"] = round(joules * r.usage["images"] / r.usage["batch_images"], 3)
        return results

    def _results(self, batch: list[Job], images: list[Any], seeds: list[list[int]], busy: float,
                 load_s: float, steps: int, guidance: Any, sched: Any, denoiser_steps: int,
                 size: tuple[int, int]) -> list[ProviderResult]:
        total = sum(len(x) for x in seeds)
        results, k = [], 0
        for idx, (j, job_seeds) in enumerate(zip(batch, seeds, strict=True)):
            raws = []
            for sd in job_seeds:
                buf = io.BytesIO()
                fmt = j.request.output_format or "png"
                images[k].save(buf, format={"jpeg": "JPEG", "webp": "WEBP"}.get(fmt, "PNG"))
                raws.append(RawImage(buf.getvalue(), sd))
                k += 1
            share = busy * len(job_seeds) / total
            charged_load = load_s if (idx == 0 and self.settings.charge_load_time) else 0.0
            usage = {"images": len(raws), "width": size[0], "height": size[1],
                     "gpu_seconds": round(share + charged_load, 6), "device": self.device,
                     "batch_images": total, "steps": steps, "denoiser_steps": denoiser_steps,
                     "load_seconds": round(load_s, 3) if idx == 0 else 0.0,
                     "load_charged": bool(charged_load)}
            applied = {"prompt": j.request.prompt, "negative_prompt": j.request.negative_prompt,
                       "size": f"{size[0]}x{size[1]}", "n": len(raws), "steps": steps,
                       "guidance_scale": guidance, "scheduler": sched or "default",
                       "seeds": job_seeds, "adapters": [a.model_dump() for a in j.request.adapters],
                       "device": self.device, "batch_images": total}
            if quantized := j.offering.settings.get("quantization"):
                bnb = j.offering.settings.get("quantization_backend") == "bitsandbytes"
                applied["quantization"] = f"{quantized} (bitsandbytes)" if bnb else quantized
            results.append(ProviderResult(raws, usage, None, applied))
        return results


def _edit_inputs(request: ImageRequest, task: str, size: tuple[int, int], count: int) -> dict[str, Any]:
    """The init image (and mask) as the pipeline takes them, at the size asked, one per image made."""
    init = request.images[0].pil().convert("RGB")
    if init.size != size:
        init = init.resize(size, PILImage.Resampling.LANCZOS)
    out: dict[str, Any] = {"image": [init] * count, "strength": request.edit_strength}
    if task == "inpaint" and request.mask is not None:
        mask = mask_image(request.mask)
        if mask.size != size:
            mask = mask.resize(size, PILImage.Resampling.NEAREST)
        out["mask_image"] = [mask] * count
    return out


class _EnergyMeter:
    """NVML's energy counter (mJ) around one pipeline call, when configured and available."""

    def __init__(self, device: str, wanted: bool) -> None:
        self.handle, self.start = None, 0
        if not (wanted and device == "cuda"):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.start = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            self.handle = None

    def joules(self) -> float | None:
        if self.handle is None:
            return None
        import pynvml

        return (pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.start) / 1000


def translate(exc: BaseException, offering: Offering) -> BaseException:
    if isinstance(exc, (ProviderError, RequestError)):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return ProviderUnavailable(f"out of GPU memory: {exc}", provider="local", offering=offering.id)
    return ProviderError(f"{type(exc).__name__}: {exc}", provider="local", offering=offering.id)
