"""What every command shares: request options, policy loading, error handling and JSON output."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..errors import ImageBrokerError
from .output import err_console, print_json, styled

F = TypeVar("F", bound=Callable[..., Any])
json_errors: contextvars.ContextVar[bool] = contextvars.ContextVar("json_errors", default=False)

PolicyOpt = Annotated[str | None, typer.Option("--policy", "-p", help="Policy file or preset name "
                                                "(default: $IMAGEBROKER_POLICY, ./imagebroker.yaml, "
                                                "then the built-in default).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
SizeOpt = Annotated[str | None, typer.Option("--size", help="WIDTHxHEIGHT, e.g. 1024x1024.")]
NOpt = Annotated[int, typer.Option("-n", "--n", help="Number of images.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed (image i gets seed + i).")]
AdapterOpt = Annotated[list[str] | None, typer.Option("--adapter", help="LoRA as REF or REF:SCALE; "
                                                       "repeat for several.")]
ControlOpt = Annotated[list[str] | None, typer.Option(
    "--control", help="A control image as KIND:PATH[:SCALE] (canny, depth, pose, ...); KIND+:PATH makes the "
                      "KIND image from PATH here (canny); repeat for several.")]
ImagePromptOpt = Annotated[list[str] | None, typer.Option(
    "--image-prompt", help="A reference image (IP-Adapter) as PATH[:SCALE]; repeat for several.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Pin an offering id or alias.")]
WideOpt = Annotated[bool, typer.Option("--wide", "-w", help="Every column, however wide the terminal "
                                        "(piped output always has every column).")]
LedgerOpt = Annotated[str | None, typer.Option("--ledger", help="Ledger URL or SQLite file path (default: "
                                                "the policy's ledger.url, $IMAGEBROKER_LEDGER_URL, then "
                                                "the user data dir).")]
TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="key=value, repeatable.")]
AspectOpt = Annotated[str | None, typer.Option("--aspect-ratio", help="W:H, e.g. 16:9: resolved per offering to a "
                                                "size it makes (the plan shows which).")]
ResolutionOpt = Annotated[str | None, typer.Option("--resolution", help="With --aspect-ratio: the long side, 512, "
                                                   "1K, 2K, 4K or pixels.")]
ImageOpt = Annotated[list[Path] | None, typer.Option("--image", "-i", help="An input image (PNG, JPEG or WebP): "
                                                     "the first is the init image, the rest references; "
                                                     "repeat for several.")]
MaskOpt = Annotated[Path | None, typer.Option("--mask", help="Where to change the init image: white = change, "
                                              "black = keep; the init image's size.")]
StrengthOpt = Annotated[float | None, typer.Option("--strength", help="How far the result may move from the "
                                                   "init image, 0 < S <= 1 (img2img).")]


class Mistake(ImageBrokerError):
    """A mistake in the command line itself (an option's value): said in one line, exit code 2."""

    exit_code = 2


def fail(message: str) -> None:
    raise Mistake(message)


def report_error(kind: str, message: str) -> None:
    """One error, as `{"error": {"type", "message"}}` on stdout under --json, else a line on stderr."""
    if json_errors.get():
        print_json({"error": {"type": kind, "message": message}})
        return
    err_console.print(styled("error: ", "red"), end="")
    err_console.print(styled(message if kind in ("Mistake", "Interrupted") else f"{kind}: {message}"))


def handle_errors(fn: F) -> F:
    """User mistakes and provider failures become one line (JSON under --json or --format json) and an
    exit code, never a traceback; Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = json_errors.set(bool(kwargs.get("json_out")) or kwargs.get("fmt") == "json")
        try:
            return fn(*args, **kwargs)
        except ImageBrokerError as exc:
            report_error(type(exc).__name__, str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            report_error("Interrupted", "interrupted")
            raise typer.Exit(130) from None
        finally:
            json_errors.reset(token)

    return wrapper  # type: ignore[return-value]


def parse_tags(tags: list[str] | None) -> dict[str, str]:
    out = {}
    for tag in tags or []:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            fail(f"--tag {tag!r} is not key=value")
        out[key] = value
    return out


def request_fields(size: str | None, n: int, seed: int | None, adapter: list[str] | None,
                   model: str | None, tag: list[str] | None) -> dict[str, Any]:
    from ..types import Adapter

    fields: dict[str, Any] = {"n": n, "tags": parse_tags(tag)}
    if size:
        fields["size"] = size
    if seed is not None:
        fields["seed"] = seed
    if adapter:
        for a in adapter:
            if not a.strip() or a.startswith(":"):
                fail(f"--adapter {a!r}: give a LoRA file, folder or Hub id (REF or REF:SCALE)")
        fields["adapters"] = tuple(Adapter.parse(a) for a in adapter)
    if model:
        fields["model"] = model
    return fields


def control_fields(control: list[str] | None, image_prompt: list[str] | None = None) -> dict[str, Any]:
    """--control and --image-prompt, each one read and checked (its file, its kind) before anything is
    paid for."""
    from ..control import Control, ImagePrompt

    fields: dict[str, Any] = {}
    for option, texts, cls in (("--control", control, Control), ("--image-prompt", image_prompt, ImagePrompt)):
        parsed = []
        for text in texts or ():
            try:
                parsed.append(cls.parse(text))
            except ValueError as exc:
                fail(str(exc) if str(exc).startswith(option) else f"{option} {text}: {exc}")
        if parsed:
            fields["control" if cls is Control else "image_prompts"] = tuple(parsed)
    return fields


def shape_fields(aspect_ratio: str | None, resolution: str | None) -> dict[str, Any]:
    """--aspect-ratio and --resolution, as the request takes them."""
    if resolution and not aspect_ratio:
        fail("--resolution goes with --aspect-ratio (or give --size)")
    return {k: v for k, v in (("aspect_ratio", aspect_ratio), ("resolution", resolution)) if v}


def edit_fields(image: list[Path] | None, mask: Path | None, strength: float | None) -> dict[str, Any]:
    """The input images, mask and strength of an edit, each file checked before anything is paid for."""
    from ..inputs import read_input

    fields: dict[str, Any] = {}
    for option, paths in (("--image", image or []), ("--mask", [mask] if mask else [])):
        read = []
        for path in paths:
            if not path.expanduser().is_file():
                fail(f"{option} {path}: file not found")
            try:
                read.append(read_input(path, option))
            except ValueError as exc:
                fail(str(exc))
        if read:
            fields["images" if option == "--image" else "mask"] = tuple(read) if option == "--image" else read[0]
    if (mask or strength is not None) and not image:
        fail(f"{'--mask' if mask else '--strength'} needs --image: the image to edit")
    if strength is not None:
        fields["strength"] = strength
    return fields


def read_only_broker(policy: str | None, ledger: str | None) -> Any:
    """A broker for commands that only look (`route`, `providers`): its ledger is never created or
    migrated, and one that does not exist yet reads as empty."""
    from ..broker.core import AsyncBroker
    from ..broker.ledger.store import Ledger
    from ..policies.loader import load_policy

    loaded = load_policy(policy)
    return AsyncBroker(loaded, ledger=Ledger(ledger or loaded.ledger.url, read_only=True), store=False)


LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


def check_adapters(request: Any) -> None:
    """A LoRA named by a file path that is not there is said now, before a pipeline is loaded or anything
    is paid for (a Hub id is left to the backend, which looks in the local cache)."""
    for a in request.adapters:
        path = Path(a.ref).expanduser()
        looks_like_path = a.ref.startswith(("/", "./", "../", "~")) or a.ref.endswith(LORA_SUFFIXES)
        if looks_like_path and not path.exists():
            fail(f"--adapter {a.ref}: file not found")
