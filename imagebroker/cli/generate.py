"""`imagebroker generate`: route, generate, write the images with provenance, print what it cost."""

from __future__ import annotations

import hashlib
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from platformdirs import user_data_dir
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..broker import provenance
from ..errors import LedgerError, RequestError
from ..types import ImageRequest, ImageResult
from .common import (
    AdapterOpt,
    AspectOpt,
    ControlOpt,
    ImagePromptOpt,
    JsonOpt,
    LedgerOpt,
    ModelOpt,
    NOpt,
    PolicyOpt,
    ResolutionOpt,
    SeedOpt,
    SizeOpt,
    TagOpt,
    check_adapters,
    control_fields,
    fail,
    handle_errors,
    request_fields,
    shape_fields,
)
from .output import console, err_console, print_json, styled, usd


def check_out(out: Path) -> None:
    """--out must be a folder that can be written, known before anything is paid for."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: is a file, not a folder (the images are named by request id inside it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        fail(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__})")


def unsaved_dir() -> Path:
    return Path(user_data_dir("imagebroker", appauthor=False)) / "unsaved"


def write_images(result: ImageResult, request: ImageRequest, out: Path, *, embed: bool = False,
                 store_prompt: bool = False) -> list[dict[str, Any]]:
    """Each image exactly as the provider sent it (its sha256 is the ledger's), with its provenance in a
    sidecar `NAME.json`; with `embed`, also in a PNG iTXt chunk (the pixels untouched), unless the image
    carries C2PA content credentials."""
    written = []
    for i, image in enumerate(result.images):
        ext = "jpg" if image.format == "jpeg" else image.format
        path = out / f"{result.request_id}-{i}.{ext}"
        meta = provenance.record(result, request, i, store_prompt=store_prompt)
        data, note = image.data, None
        if embed:
            try:
                data = provenance.embed_png(image, meta)
            except RequestError as exc:
                note = str(exc)
        with open(path, "xb") as f:   # never over a file already there
            f.write(data)
        with open(path.with_suffix(".json"), "xb") as f:
            f.write(provenance.sidecar(meta))
        written.append({"path": str(path), "sidecar": str(path.with_suffix(".json")), "seed": image.seed,
                        "width": image.width, "height": image.height, "sha256": hashlib.sha256(data).hexdigest(),
                        "image_sha256": image.sha256, "c2pa": image.c2pa, "embedded": embed and note is None,
                        "note": note})
    return written


def save_paid(result: ImageResult, request: ImageRequest, out: Path, **how: Any) -> list[dict[str, Any]]:
    """The images written into --out; if that fails now (it was checked before the call), into the user
    data dir instead, and said so: images that were paid for are never lost."""
    try:
        return write_images(result, request, out, **how)
    except OSError as exc:
        rescue = unsaved_dir()
        try:
            rescue.mkdir(parents=True, exist_ok=True)
            images = write_images(result, request, rescue, **how)
        except OSError as again:
            kept = "they are in the image store (`imagebroker store get SHA`)" if result.images else "none came"
            err_console.print(styled(f"could not write the images into {out} ({exc.strerror}) nor {rescue} "
                                     f"({again.strerror}); {kept}: "
                                     f"{', '.join(i.sha256 for i in result.images)}", "red"))
            raise typer.Exit(1) from None
        err_console.print(styled(f"could not write into {out} ({exc.strerror or type(exc).__name__}): the "
                                 f"images are in {rescue} instead", "yellow"))
        return images


def _run_with_progress(broker: Any, request: ImageRequest, quiet: bool, timeout: float | None) -> ImageResult:
    if quiet:
        return broker.generate(request, timeout=timeout)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.fields[steps]}"), TimeElapsedColumn()]
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("routing", total=None, steps="")
        lock = threading.Lock()

        def on_attempt(offering: str, number: int) -> None:
            with lock:
                again = f" (attempt {number})" if number > 1 else ""
                progress.update(task, description=f"{offering}{again}", completed=0, total=None, steps="")

        def on_step(step: int, total: int) -> None:
            with lock:
                progress.update(task, completed=step, total=total, steps=f"step {step}/{total}")

        return broker.generate(request, progress=on_step, on_attempt=on_attempt, timeout=timeout)


def result_json(result: ImageResult, images: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "request_id": result.request_id, "offering": result.offering, "images": images,
        "cost": {"usd": result.cost.usd, "status": result.cost.status, "unit": result.cost.unit,
                 "detail": result.cost.detail},
        "latency_s": result.latency_s,
        "attempts": [{"offering": a.offering, "status": a.status, "error": a.error,
                      "error_type": a.error_type, "latency_s": a.latency_s} for a in result.attempts],
        "applied": result.applied, "dropped": list(result.dropped), "warnings": list(result.warnings)}


OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for the images (created if missing).")]
NegativeOpt = Annotated[str | None, typer.Option("--negative", help="Negative prompt.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Denoising steps.")]
GuidanceOpt = Annotated[float | None, typer.Option("--guidance", help="Guidance scale.")]
SchedulerOpt = Annotated[str | None, typer.Option("--scheduler", help="Local scheduler name (euler, dpmpp_2m, ...).")]
QualityOpt = Annotated[str | None, typer.Option("--quality", help="low, medium, high, ...")]
FormatOpt = Annotated[str | None, typer.Option("--output-format", help="png, jpeg or webp.")]
TimeoutOpt = Annotated[float | None, typer.Option("--timeout", help="Seconds for the whole call, fallbacks "
                                                  "included; past it the call is cancelled (exit 124).")]
EmbedOpt = Annotated[bool, typer.Option("--embed-provenance", help="Also put the provenance into each PNG (an "
                                        "iTXt chunk; the pixels untouched), unless it carries C2PA content "
                                        "credentials.")]
NoStoreOpt = Annotated[bool, typer.Option("--no-store", help="Keep no copy in the image store (on by default "
                                          "here; the policy's store.enabled: false turns it off too).")]


@handle_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    size: SizeOpt = None, n: NOpt = 1, seed: SeedOpt = None, adapter: AdapterOpt = None,
    control: ControlOpt = None,
    image_prompt: ImagePromptOpt = None,
    model: ModelOpt = None, tag: TagOpt = None, policy: PolicyOpt = None, out: OutOpt = Path("."),
    negative: NegativeOpt = None, steps: StepsOpt = None, guidance: GuidanceOpt = None,
    scheduler: SchedulerOpt = None, quality: QualityOpt = None, output_format: FormatOpt = None,
    timeout: TimeoutOpt = None, embed_provenance: EmbedOpt = False, no_store: NoStoreOpt = False,
    aspect_ratio: AspectOpt = None, resolution: ResolutionOpt = None,
    ledger: LedgerOpt = None, json_out: JsonOpt = False,
) -> None:
    """Generate images for PROMPT, write them into --out exactly as the provider sent them (provenance in a
    NAME.json beside each), and print offering, cost and latency."""
    fields = (request_fields(size, n, seed, adapter, model, tag) | control_fields(control, image_prompt)
              | shape_fields(aspect_ratio, resolution)
              | option_fields(negative, steps, guidance, scheduler, quality, output_format))
    request = ImageRequest(prompt=prompt, **fields)
    make_images(request, policy=policy, ledger=ledger, out=out, timeout=timeout, embed=embed_provenance,
                no_store=no_store, json_out=json_out)


def option_fields(negative: str | None, steps: int | None, guidance: float | None, scheduler: str | None,
                  quality: str | None, output_format: str | None) -> dict[str, Any]:
    """The sampling and output options `generate` and `edit` share, as the request takes them (given ones only)."""
    given = {"negative_prompt": negative, "steps": steps, "guidance_scale": guidance, "scheduler": scheduler,
             "quality": quality, "output_format": output_format}
    return {k: v for k, v in given.items() if v is not None}


def make_images(request: ImageRequest, *, policy: str | None, ledger: str | None, out: Path,
                timeout: float | None, embed: bool, no_store: bool, json_out: bool) -> None:
    """What `generate` and `edit` share: check --out, run the call, write the images, print the result."""
    from ..broker.sync import Broker

    if timeout is not None and not timeout > 0:
        fail(f"--timeout {timeout:g}: must be a positive number of seconds")
    check_out(out)
    check_adapters(request)
    unrecorded = None
    with Broker(policy, ledger, store=not no_store) as broker:
        try:
            result = _run_with_progress(broker, request, quiet=json_out, timeout=timeout)
        except LedgerError as exc:
            if exc.result is None:
                raise
            result, unrecorded = exc.result, exc  # paid for: write the images, then say so and fail
    images = save_paid(result, request, out, embed=embed,
                       store_prompt=broker.policy.ledger.store_prompts)
    if unrecorded is not None:
        err_console.print(styled(f"error: {unrecorded}", "red"))
    if json_out:
        print_json(result_json(result, images))
        if unrecorded is not None:
            raise typer.Exit(unrecorded.exit_code)
        return
    for img in images:
        if img["note"]:
            err_console.print(styled(f"{Path(img['path']).name}: {img['note']}", "yellow"))
        seed = f", seed {img['seed']}" if img["seed"] is not None else ""
        console.print(f"wrote {img['path']} ({img['width']}x{img['height']}{seed})", markup=False)
    console.print(f"offering {result.offering}  cost {usd(result.cost.usd)} ({result.cost.status}: "
                  f"{result.cost.detail})  latency {result.latency_s:.2f} s  attempts {len(result.attempts)}",
                  markup=False)
    if result.dropped:
        err_console.print(styled(f"not supported by {result.offering}, so not sent: {', '.join(result.dropped)}",
                                 "yellow"))
    for warning in result.warnings:
        err_console.print(styled(f"warning: {warning}", "yellow"))
    if unrecorded is not None:
        raise typer.Exit(unrecorded.exit_code)
