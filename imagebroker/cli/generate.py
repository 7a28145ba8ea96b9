"""`imagebroker generate`: route, generate, write the images with provenance, print what it cost."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from PIL import Image, PngImagePlugin
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..errors import LedgerError
from ..types import GeneratedImage, ImageRequest, ImageResult
from .common import (
    AdapterOpt,
    JsonOpt,
    ModelOpt,
    NOpt,
    PolicyOpt,
    SeedOpt,
    SizeOpt,
    TagOpt,
    console,
    err_console,
    handle_errors,
    print_json,
    request_fields,
    usd,
)

EXIF_IMAGE_DESCRIPTION = 0x010E


def provenance(result: ImageResult, request: ImageRequest, image: GeneratedImage) -> dict[str, Any]:
    return {"generator": "imagebroker", "request_id": result.request_id, "offering": result.offering,
            "prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": image.seed,
            "applied": result.applied, "cost_usd": str(result.cost.usd), "cost_status": result.cost.status}


def with_provenance(image: GeneratedImage, meta: dict[str, Any]) -> bytes:
    """The image bytes with provenance in PNG text chunks, or EXIF ImageDescription for JPEG/WebP."""
    text = json.dumps(meta, default=str)
    img = Image.open(io.BytesIO(image.data))
    buf = io.BytesIO()
    if image.format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("imagebroker", text)
        info.add_text("prompt", meta["prompt"])
        img.save(buf, format="PNG", pnginfo=info)
    else:
        exif = img.getexif()
        exif[EXIF_IMAGE_DESCRIPTION] = text
        img.save(buf, format=image.format.upper(), exif=exif, quality=95)
    return buf.getvalue()


def write_images(result: ImageResult, request: ImageRequest, out: Path) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(result.images):
        ext = "jpg" if image.format == "jpeg" else image.format
        path = out / f"{result.request_id}-{i}.{ext}"
        data = with_provenance(image, provenance(result, request, image))
        path.write_bytes(data)
        written.append({"path": str(path), "seed": image.seed, "width": image.width,
                        "height": image.height, "sha256": hashlib.sha256(data).hexdigest(),
                        "image_sha256": image.sha256})
    return written


def _run_with_progress(broker: Any, request: ImageRequest, quiet: bool) -> ImageResult:
    if quiet:
        return broker.generate(request)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn(
        "{task.completed}/{task.total}"), TimeElapsedColumn()]
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("generating", total=None)
        lock = threading.Lock()

        def on_step(step: int, total: int) -> None:
            with lock:
                progress.update(task, completed=step, total=total, description="denoising")

        return broker.generate(request, progress=on_step)


@handle_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    size: SizeOpt = None, n: NOpt = 1, seed: SeedOpt = None, adapter: AdapterOpt = None,
    model: ModelOpt = None, tag: TagOpt = None, policy: PolicyOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the images.")] = Path("."),
    negative: Annotated[str | None, typer.Option("--negative", help="Negative prompt.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Denoising steps.")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", help="Guidance scale.")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Local scheduler name "
                                                  "(euler, dpmpp_2m, ...).")] = None,
    quality: Annotated[str | None, typer.Option("--quality", help="low, medium, high, ...")] = None,
    output_format: Annotated[str | None, typer.Option("--output-format", help="png, jpeg or webp.")]
    = None,
    json_out: JsonOpt = False,
) -> None:
    """Generate images for PROMPT, write them into --out, and print offering, cost and latency."""
    from ..broker.sync import Broker

    fields = request_fields(size, n, seed, adapter, model, tag)
    extra = {"negative_prompt": negative, "steps": steps, "guidance_scale": guidance,
             "scheduler": scheduler, "quality": quality, "output_format": output_format}
    request = ImageRequest(prompt=prompt, **fields, **{k: v for k, v in extra.items() if v is not None})
    unrecorded = None
    with Broker(policy) as broker:
        try:
            result = _run_with_progress(broker, request, quiet=json_out)
        except LedgerError as exc:
            if exc.result is None:
                raise
            result, unrecorded = exc.result, exc  # paid for: write the images, then say so and fail
    images = write_images(result, request, out)
    if unrecorded is not None:
        err_console.print(f"[red]error: {unrecorded}[/red]")
    if json_out:
        print_json({
            "request_id": result.request_id, "offering": result.offering, "images": images,
            "cost": {"usd": result.cost.usd, "status": result.cost.status, "unit": result.cost.unit,
                     "detail": result.cost.detail},
            "latency_s": result.latency_s,
            "attempts": [{"offering": a.offering, "status": a.status, "error": a.error,
                          "error_type": a.error_type, "latency_s": a.latency_s}
                         for a in result.attempts],
            "applied": result.applied, "dropped": list(result.dropped)})
        if unrecorded is not None:
            raise typer.Exit(unrecorded.exit_code)
        return
    for img in images:
        console.print(f"wrote {img['path']} ({img['width']}x{img['height']}, seed {img['seed']})")
    console.print(f"offering [bold]{result.offering}[/bold]  cost {usd(result.cost.usd)} "
                  f"({result.cost.status}: {result.cost.detail})  latency {result.latency_s:.2f} s  "
                  f"attempts {len(result.attempts)}")
    if result.dropped:
        console.print(f"[yellow]not supported by {result.offering}, so not sent: "
                      f"{', '.join(result.dropped)}[/yellow]")
    if unrecorded is not None:
        raise typer.Exit(unrecorded.exit_code)
