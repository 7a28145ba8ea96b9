"""The values that cross the public API: the request, the result, and what planning and pricing say."""

from __future__ import annotations

import functools
import hashlib
import math
import re
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .control import MAX_CONTROLS, MAX_IMAGE_PROMPTS, Control, ImagePrompt
from .errors import RequestError
from .inputs import MAX_INPUT_IMAGES, InputImage, read_input

MIN_SIDE, MAX_SIDE = 64, 4096
MAX_N = 10
MAX_TAG_VALUE = 256  # the ledger's call_tags.value
CostStatus = Literal["priced", "estimated", "unpriced", "cached"]
Quality = Literal["auto", "low", "medium", "high", "xhigh", "max"]
OutputFormat = Literal["png", "jpeg", "webp"]
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_RATIO = re.compile(r"^(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _request_error(exc: ValidationError) -> RequestError:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "request"
        msg = str(err["msg"]).removeprefix("Value error, ")
        own = msg.startswith(("size ", "aspect_ratio ", "resolution ", "images[", "mask"))   # they name their field
        parts.append(msg if own else f"{field}: {msg}")
    return RequestError("; ".join(parts))


RATIO_TOLERANCE = 0.01   # |log| of the ratio between two aspect ratios still taken as the same
RESOLUTIONS = {"512": 512, "1K": 1024, "2K": 2048, "4K": 4096}


def _resolution(value: str) -> int:
    key = value.strip().upper()
    if key in RESOLUTIONS:
        return RESOLUTIONS[key]
    if key.isdigit():
        return int(key)
    raise ValueError(f'resolution "{value}" is not 512, 1K, 2K, 4K or a number of pixels')


@functools.lru_cache(maxsize=1024)
def parse_ratio(ratio: str) -> tuple[float, float]:
    m = _RATIO.match(ratio.strip())
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise ValueError(f'aspect_ratio "{ratio}" is not W:H, e.g. 16:9')
    w, h = float(m.group(1)), float(m.group(2))
    if not 1 / 8 <= w / h <= 8:
        raise ValueError(f'aspect_ratio "{ratio}" is outside 1:8..8:1')
    return w, h


def off_ratio(width: int, height: int, ratio: str) -> bool:
    """Whether WxH is another aspect ratio than `ratio` (beyond RATIO_TOLERANCE)."""
    rw, rh = parse_ratio(ratio)
    return abs(math.log((width / height) / (rw / rh))) > RATIO_TOLERANCE


@functools.lru_cache(maxsize=1024)
def parse_size(size: str) -> tuple[int, int]:
    m = _SIZE.match(size.strip())
    if not m or not all(MIN_SIDE <= int(v) <= MAX_SIDE for v in m.groups()):
        raise ValueError(f'size "{size}" is not WIDTHxHEIGHT with both sides {MIN_SIDE}..{MAX_SIDE}')
    return int(m.group(1)), int(m.group(2))


class Adapter(_Frozen):
    """A LoRA (or other adapter) to apply: a path, a Hub id or a provider-specific reference."""

    ref: str = Field(min_length=1)
    scale: float = Field(default=1.0, ge=-4.0, le=4.0)

    @classmethod
    def parse(cls, text: str) -> Adapter:
        """`REF` or `REF:SCALE` (the scale after the last colon, when it is a number)."""
        ref, _, scale = text.rpartition(":")
        try:
            return cls(ref=ref, scale=float(scale)) if ref else cls(ref=text)
        except ValueError:
            return cls(ref=text)


class ImageRequest(_Frozen):
    """One request: text-to-image, or an edit when `images` are given (the first is the init image, the
    rest references; `mask` is white where the init image is to change; see `imagebroker.inputs`).
    Field names follow the OpenAI images API and Diffusers."""

    prompt: str = Field(min_length=1, max_length=32_000)
    negative_prompt: str | None = None
    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)
    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)
    aspect_ratio: str | None = None
    resolution: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE,
                                   description="long side in pixels (or 512, 1K, 2K, 4K), with aspect_ratio")
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    steps: int | None = Field(default=None, ge=1, le=500)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)
    scheduler: str | None = None
    quality: Quality | None = None
    output_format: OutputFormat | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    adapters: tuple[Adapter, ...] = ()
    model: str | None = Field(default=None, max_length=200)
    tags: dict[str, str] = Field(default_factory=dict)
    max_cost_usd: Decimal | None = Field(default=None, ge=0)
    max_latency_s: float | None = Field(default=None, gt=0)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    # previews while it generates, for offerings that stream them (gpt-image: 0-3; each is billed as
    # output tokens); others send only the final image. They reach a `progress` callback that takes 3 args
    partial_images: int = Field(default=0, ge=0, le=3)
    extra: dict[str, dict[str, Any]] = Field(default_factory=dict)
    images: tuple[InputImage, ...] = Field(default=(), max_length=MAX_INPUT_IMAGES)
    mask: InputImage | None = None
    strength: float | None = Field(default=None, gt=0.0, le=1.0,
                                   description="how far img2img may move from the init image")
    control: tuple[Control, ...] = Field(default=(), max_length=MAX_CONTROLS)   # ControlNet (`control.py`)
    image_prompts: tuple[ImagePrompt, ...] = Field(default=(), max_length=MAX_IMAGE_PROMPTS)   # IP-Adapter

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _request_error(exc) from None

    @model_validator(mode="before")
    @classmethod
    def _size_forms(cls, data: Any) -> Any:
        """`size` is width and height; `aspect_ratio` (with an optional `resolution`) stays as asked and is
        resolved per offering (`providers.offering.request_size`); a size that disagrees with it is refused."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        size = data.pop("size", None)
        if size is not None:
            if data.get("width") or data.get("height"):
                raise ValueError("give size, or width/height; not both")
            data["width"], data["height"] = parse_size(str(size))
        if isinstance(data.get("resolution"), str):
            data["resolution"] = _resolution(data["resolution"])
        ratio = data.get("aspect_ratio")
        if ratio is not None:
            parse_ratio(str(ratio))   # a ratio it can read
            if data.get("width") and data.get("height") and off_ratio(data["width"], data["height"], str(ratio)):
                raise ValueError(f'aspect_ratio "{ratio}" and size {data["width"]}x{data["height"]} disagree')
        elif data.get("resolution") is not None:
            raise ValueError("resolution goes with aspect_ratio (a size says both)")
        return data

    @field_validator("images", mode="before")
    @classmethod
    def _read_images(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, (str, bytes, bytearray, memoryview, InputImage, dict)) or hasattr(value, "mode") \
                or not hasattr(value, "__iter__"):
            value = [value]   # one image given on its own (a path, bytes, a PIL image)
        items = list(value)
        if len(items) > MAX_INPUT_IMAGES:
            raise ValueError(f"{len(items)} input images, at most {MAX_INPUT_IMAGES}")
        return tuple(read_input(v, f"images[{i}]") for i, v in enumerate(items))

    @field_validator("mask", mode="before")
    @classmethod
    def _read_mask(cls, value: Any) -> Any:
        return None if value is None else read_input(value, "mask")

    @model_validator(mode="after")
    def _pairs(self) -> ImageRequest:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height go together: give both or neither")
        if self.mask is not None:
            if not self.images:
                raise ValueError("mask needs an image to apply to: give images too")
            init = self.images[0]
            if (self.mask.width, self.mask.height) != (init.width, init.height):
                raise ValueError(f"mask is {self.mask.size}, the init image {init.size}: they must be the "
                                 "same size")
        if self.strength is not None and not self.images:
            raise ValueError("strength applies to an edit: give images too")
        if self.background == "transparent" and self.output_format == "jpeg":
            raise ValueError("background transparent needs output_format png or webp, not jpeg")
        return self

    @field_validator("tags")
    @classmethod
    def _tag_keys(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", key):
                raise ValueError(f"tag key {key!r} must be 1-64 letters, digits, '_', '.', '-'")
            if len(value) > MAX_TAG_VALUE:  # the ledger's limit: found here, before anything is paid
                raise ValueError(f"tag {key}: value of {len(value)} characters, at most {MAX_TAG_VALUE}")
        return tags

    @field_validator("prompt", "negative_prompt", "model", "scheduler", "idempotency_key", "tags")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        """A NUL character is never meant, and PostgreSQL refuses it in text: refused up front."""
        texts = [*value.keys(), *value.values()] if isinstance(value, dict) else [value]
        if any(isinstance(t, str) and "\x00" in t for t in texts):
            raise ValueError("contains a NUL character")
        return value

    @property
    def size(self) -> str | None:
        return f"{self.width}x{self.height}" if self.width else None

    @property
    def is_edit(self) -> bool:
        return bool(self.images)

    @property
    def init_image(self) -> InputImage | None:
        return self.images[0] if self.images else None

    @property
    def edit_strength(self) -> float:
        """The strength asked, else the local backend's default (Diffusers' own defaults differ per
        pipeline): 1.0 with a mask (the masked area is repainted), 0.8 without (img2img keeps the layout).
        ComfyUI is sent only a strength asked; without one, the workflow's own denoise applies."""
        if self.strength is not None:
            return self.strength
        return 1.0 if self.mask is not None else 0.8

    def prompt_sha256(self) -> str:
        return hashlib.sha256(self.prompt.encode()).hexdigest()


class Cost(_Frozen):
    """Money in Decimal USD, and how sure we are of it. `usd` is None only when status is unpriced."""

    usd: Decimal | None
    status: CostStatus
    unit: str
    units: dict[str, Any] = Field(default_factory=dict)
    detail: str = ""

    @model_validator(mode="after")
    def _honest(self) -> Cost:
        if (self.usd is None) != (self.status == "unpriced"):
            raise ValueError("a cost has usd exactly when it is not unpriced")
        return self

    @classmethod
    def unpriced(cls, unit: str, why: str, units: dict[str, Any] | None = None) -> Cost:
        return cls(usd=None, status="unpriced", unit=unit, units=units or {}, detail=why)

    def __str__(self) -> str:
        return "unpriced" if self.usd is None else f"${self.usd:.6f} ({self.status})"


class GeneratedImage(_Frozen):
    data: bytes = Field(repr=False)
    format: OutputFormat
    width: int
    height: int
    seed: int | None = None
    c2pa: bool = False   # carries the provider's C2PA content credentials (never re-encoded here)

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class Rejection(_Frozen):
    offering: str
    reasons: tuple[str, ...]


class Candidate(_Frozen):
    offering: str
    estimated_cost: Cost
    estimated_latency_s: float | None
    dropped: tuple[str, ...] = ()
    bound_usd: Decimal | None = None   # the most the call can cost here (budgets reserve this); None: unpriced
    warnings: tuple[str, ...] = ()     # what a caller should know of this offering (it shuts down soon)
    size: str | None = None            # the size it will make (an aspect ratio resolved for it)


class Plan(_Frozen):
    candidates: tuple[Candidate, ...]
    rejected: tuple[Rejection, ...]
    policy: str
    rule: str | None = None
    objective: str = "cheapest"

    def as_json(self) -> dict[str, Any]:
        """The plan as `route --json` prints it and the gateway's `/v1/route` answers it."""
        return {
            "policy": self.policy, "rule": self.rule, "objective": self.objective,
            "candidates": [{"offering": c.offering, "estimated_cost_usd": c.estimated_cost.usd,
                            "bound_usd": c.bound_usd, "cost_status": c.estimated_cost.status,
                            "estimated_latency_s": c.estimated_latency_s, "dropped": list(c.dropped),
                            "warnings": list(c.warnings), "size": c.size}
                           for c in self.candidates],
            "rejected": [{"offering": r.offering, "reasons": list(r.reasons)} for r in self.rejected],
        }


class Attempt(_Frozen):
    number: int
    offering: str
    started_at: datetime
    latency_s: float
    status: Literal["ok", "error"]
    error_type: str | None = None
    error: str | None = None
    http_status: int | None = None
    provider_request_id: str | None = None
    cost: Cost | None = None


class SkipReason(StrEnum):
    """Why a planned offering was passed over without being tried."""

    CIRCUIT_OPEN = "circuit_open"      # its provider failed repeatedly; cooling down
    PRICE_UNKNOWN = "price_unknown"    # a budget applies, and without a price it cannot be checked
    OVER_BUDGET = "over_budget"        # a `restrict` budget refused its reservation
    RATE_LIMITED = "rate_limited"      # its provider's `rate_limit` had no slot within the call's timeout


class PartialImage(_Frozen):
    """A preview of an image still being made (`partial_images`): what a 3-argument `progress(index, total,
    partial)` callback receives, index 1 to total, as the provider streams them."""

    index: int
    total: int
    data: bytes = Field(repr=False)
    format: str
    offering: str


class Skip(_Frozen):
    """A planned offering the call passed over, and why (no request was sent)."""

    offering: str
    reason: SkipReason
    detail: str
    at: datetime


class ImageResult(_Frozen):
    request_id: str
    images: tuple[GeneratedImage, ...]
    offering: str
    cost: Cost
    latency_s: float
    plan: Plan
    attempts: tuple[Attempt, ...]
    applied: dict[str, Any]
    dropped: tuple[str, ...] = ()
    skipped: tuple[Skip, ...] = ()
    warnings: tuple[str, ...] = ()   # what the caller should know of these images (a demo model's limits)
