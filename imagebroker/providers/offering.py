"""What the catalog says about one offering: capabilities, price rule, license, regions, provenance."""

from __future__ import annotations

import math
from datetime import date
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..types import ImageRequest, parse_ratio, parse_size

Kind = Literal["closed", "open-weight-hosted", "canvas", "local"]
SHUTDOWN_WARNING_DAYS = 30
Confidence = Literal["high", "medium", "low"]


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SizeRule(_Data):
    """Any WxH inside these bounds (gpt-image-2, FLUX hosts, local models)."""

    min_side: int = 64
    max_side: int = 2048
    multiple_of: int = 8
    max_megapixels: float | None = None
    max_aspect: float = 4.0  # long side / short side

    def check(self, width: int, height: int) -> str | None:
        if min(width, height) < self.min_side or max(width, height) > self.max_side:
            return f"size {width}x{height} outside {self.min_side}..{self.max_side} px"
        if width % self.multiple_of or height % self.multiple_of:
            return f"size {width}x{height} not a multiple of {self.multiple_of}"
        if self.max_megapixels and width * height > self.max_megapixels * 1_000_000:
            return f"size {width}x{height} above {self.max_megapixels} MP"
        if max(width, height) / min(width, height) > self.max_aspect:
            return f"size {width}x{height} aspect ratio beyond {self.max_aspect}:1"
        return None


class EditCaps(_Data):
    """What an offering can do with input images (an edit request)."""

    max_images: int = Field(default=1, ge=1)   # input images it takes; the first is the init image
    mask: bool = False            # inpainting: a mask says where to change
    mask_required: bool = False   # an inpainting endpoint: no edit without a mask
    strength: bool = False        # img2img: how far it may move from the init image
    # the size of what it returns: the size asked (`asked`), the init image's (`input`: a size asked
    # is dropped), or one it picks itself from the init image's aspect ratio (`any`, within size_rule)
    output_size: Literal["asked", "input", "any"] = "asked"
    note: str = ""


class Capabilities(_Data):
    default_size: str = "1024x1024"
    sizes: tuple[str, ...] = ()          # fixed list; empty means size_rule decides
    size_rule: SizeRule | None = None
    max_n: int = 1
    seed: bool = False
    negative_prompt: bool = False
    steps: bool = False
    guidance: bool = False
    scheduler: bool = False
    adapters: bool = False
    max_adapters: int = 0
    transparent_background: bool = False
    qualities: tuple[str, ...] = ()
    output_formats: tuple[str, ...] = ("png",)
    edit: EditCaps | None = None     # None: text-to-image only
    text_to_image: bool = True       # False: an edit-only endpoint (FLUX Fill, Stability inpaint)
    partial_images: int = 0          # the most previews it streams while generating (gpt-image: 3)
    control: tuple[str, ...] = ()    # the control kinds it can follow (ControlNet: canny, depth, ...)
    max_controls: int = 1            # how many controls at once (a local model: one per ControlNet it has)
    control_size: Literal["asked", "input"] = "asked"   # input: the output takes the control image's size
    control_required: bool = False   # a control endpoint (BFL Canny/Depth): nothing without a control image
    # which of a control's settings it honours (the rest would be dropped: a soft reason), the largest
    # control or image-prompt scale it takes, and what it wants as the image: the control image itself, or
    # the source image it makes the control from (Replicate's FLUX Canny/Depth run their own preprocessing)
    control_settings: tuple[Literal["scale", "window"], ...] = ("scale", "window")
    max_scale: float = 2.0
    control_input: Literal["control", "source"] = "control"
    image_prompts: int = 0           # the most reference images it takes (IP-Adapter; 0: none)
    image_prompts_required: bool = False   # a style endpoint (Stability's control/style): nothing without one

    @model_validator(mode="after")
    def _sizes(self) -> Capabilities:
        for s in (self.default_size, *self.sizes):
            parse_size(s)
        if not self.sizes and self.size_rule is None:
            object.__setattr__(self, "sizes", (self.default_size,))
        return self

    def size_problem(self, width: int, height: int) -> str | None:
        if self.sizes:
            if f"{width}x{height}" in self.sizes:
                return None
            return f"size {width}x{height} not offered (sizes: {', '.join(self.sizes)})"
        assert self.size_rule is not None
        return self.size_rule.check(width, height)


class _PriceBase(_Data):
    source: str
    checked: date
    since: date | None = None      # the day this price took effect, when known (else it held on `checked`)
    confidence: Confidence
    note: str = ""
    uplift: Decimal = Decimal(0)   # set from a region option: +10% for OpenAI data residency


class PerImagePrice(_PriceBase):
    unit: Literal["per_image"]
    usd: Decimal = Field(ge=0)
    table: tuple[PerImageRow, ...] = ()   # size x quality exceptions to `usd`


class PerImageRow(_Data):
    size: str | None = None
    quality: str | None = None
    usd: Decimal = Field(ge=0)


class PerMegapixelPrice(_PriceBase):
    unit: Literal["per_megapixel"]
    usd_per_mp: Decimal = Field(ge=0)
    # BFL FLUX.2: the first MP costs this, each further MP usd_per_mp
    first_mp_usd: Decimal | None = Field(default=None, ge=0)
    rounding: Literal["exact", "ceil"] = "exact"   # fal rounds each image up to whole MP
    input_usd_per_mp: Decimal | None = Field(default=None, ge=0)   # each input image's MP (FLUX.2 edits)


class PerTokenPrice(_PriceBase):
    unit: Literal["per_token"]
    text_input: Decimal = Field(ge=0)
    image_input: Decimal = Field(default=Decimal(0), ge=0)
    image_output: Decimal = Field(ge=0)
    text_output: Decimal = Field(default=Decimal(0), ge=0)
    cached_text_input: Decimal | None = Field(default=None, ge=0)
    cached_image_input: Decimal | None = Field(default=None, ge=0)
    # image-output tokens per image at a reference size, by quality (estimate before the call)
    output_tokens: dict[str, int] = Field(default_factory=dict)
    output_tokens_size: str = "1024x1024"
    # image-input tokens per input image (an edit), to estimate before the call; usage settles, and the
    # bound reserves `input_image_tokens_max` (default twice the estimate: high input fidelity)
    input_image_tokens: int = Field(default=0, ge=0)
    input_image_tokens_max: int | None = Field(default=None, ge=0)
    # image-output tokens each streamed preview adds (`partial_images`)
    partial_image_tokens: int = Field(default=0, ge=0)


class PerSecondPrice(_PriceBase):
    unit: Literal["per_second"]
    usd_per_second: Decimal = Field(ge=0)
    hardware: str
    typical_seconds: float   # per image, to estimate before the call
    max_seconds: float | None = Field(default=None, gt=0)   # per image, for the bound (else latency p95)


class PerCreditPrice(_PriceBase):
    unit: Literal["per_credit"]
    credits: Decimal = Field(ge=0)          # per image
    usd_per_credit: Decimal = Field(default=Decimal("0.01"), ge=0)


class GpuSecondsPrice(_PriceBase):
    unit: Literal["gpu_seconds"]
    usd_per_gpu_hour: Decimal | None = Field(default=None, ge=0)   # from the policy; None leaves GPU runs unpriced
    cpu_usd_per_hour: Decimal = Field(default=Decimal(0), ge=0)
    # owned hardware: add measured energy (NVML) at this rate
    energy_usd_per_kwh: Decimal | None = Field(default=None, ge=0)
    typical_seconds: float = 5.0              # per image on the reference device


PriceRule = Annotated[
    PerImagePrice | PerMegapixelPrice | PerTokenPrice | PerSecondPrice | PerCreditPrice
    | GpuSecondsPrice,
    Field(discriminator="unit"),
]


class License(_Data):
    commercial_use: Literal["yes", "no", "conditional"]
    name: str
    note: str = ""


class Latency(_Data):
    p50_s: float
    p95_s: float


class RegionOption(_Data):
    """A processing region a provider can be pinned to (OpenAI data residency, BFL's EU host)."""

    regions: tuple[str, ...]
    uplift: Decimal = Decimal(0)   # price multiplier minus one, e.g. 0.10 for +10%
    base_url: str | None = None


class Offering(_Data):
    id: str
    provider: str
    model: str
    kind: Kind
    aliases: tuple[str, ...] = ()
    capabilities: Capabilities
    price: PriceRule | None = None
    # earlier prices, each with the day it took effect (`since`): what `whatif --prices-as-of` replays with
    price_history: tuple[PriceRule, ...] = ()
    license: License
    regions: tuple[str, ...]
    latency: Latency
    rank: int = Field(default=50, ge=0, le=100)  # editorial quality rank used by objective "best"
    status: Literal["current", "deprecated", "shutdown"] = "current"
    shutdown: date | None = None
    source: str
    checked: date
    notes: str = ""
    demo: bool = False                 # a demo model: planned last unless a policy names it
    deterministic: bool = False        # the same seeded request gives the same bytes (the cache may answer it)
    trained_size: str | None = None    # the one size it was trained at, when it draws nothing good at others
    region_options: dict[str, RegionOption] = Field(default_factory=dict)
    settings: dict[str, object] = Field(default_factory=dict)  # provider-specific (endpoint, version)

    @model_validator(mode="after")
    def _id(self) -> Offering:
        if self.id != f"{self.provider}/{self.model}":
            raise ValueError(f"id must be provider/model, i.e. {self.provider}/{self.model}")
        if self.price_history and self.price is None:
            raise ValueError("price_history needs a current price")
        for old in self.price_history:
            if old.since is None or self.price is None or old.since >= _took_effect(self.price):
                raise ValueError("each price_history entry needs `since`, a day before the current price's "
                                 "(its `since`, else its `checked`)")
        return self

    def price_on(self, day: date) -> tuple[PriceRule | None, bool]:
        """The price in effect on `day`, and whether the catalog records it: the latest of the current price
        and `price_history` that had taken effect by then. Before all of them, today's price stands in (not
        recorded). A GPU-seconds price is the policy's own rate, so it holds on any day."""
        if self.price is None or isinstance(self.price, GpuSecondsPrice):
            return self.price, True
        held = [r for r in (self.price, *self.price_history) if _took_effect(r) <= day]
        if not held:
            return self.price, False
        rule = max(held, key=_took_effect)
        return (rule if rule is self.price else rule.model_copy(update={"uplift": self.price.uplift})), True

    def retired(self, today: date) -> bool:
        return self.status == "shutdown" or (self.shutdown is not None and self.shutdown <= today)

    def shutdown_warning(self, today: date) -> str | None:
        """Said when it shuts down within SHUTDOWN_WARNING_DAYS: still planned, but not for long."""
        if self.shutdown is None or self.retired(today):
            return None
        days = (self.shutdown - today).days
        if days > SHUTDOWN_WARNING_DAYS:
            return None
        plural = "s" if days != 1 else ""
        return f"{self.id} shuts down on {self.shutdown} (in {days} day{plural}): move to another offering"


def _took_effect(rule: PriceRule) -> date:
    return rule.since or rule.checked


def offering_warnings(request: ImageRequest, offering: Offering) -> tuple[str, ...]:
    """What a caller should be told of images this offering makes for this request."""
    if offering.trained_size is None:
        return ()
    w, h = request_size(request, offering)
    if (w, h) == parse_size(offering.trained_size):
        return ()
    return (f"{offering.id} was trained at {offering.trained_size} only: at {w}x{h} its images are "
            "noise, not shapes",)


def request_size(request: ImageRequest, offering: Offering) -> tuple[int, int]:
    """The size the request asks of this offering: for an edit where the offering returns the init image's
    size, that size; with control where the offering takes the control image's size, that one; else the
    request's own; else, for an edit, the init image's when the offering takes
    it; else the offering's default."""
    caps, init = offering.capabilities, request.init_image
    if init is not None and caps.edit is not None and caps.edit.output_size == "input":
        return init.width, init.height
    if request.control and caps.control_size == "input":   # BFL Canny/Depth: the control image's size
        return request.control[0].image.width, request.control[0].image.height
    if request.width and request.height:
        return request.width, request.height
    if request.aspect_ratio:
        return aspect_size(request.aspect_ratio, request.resolution, caps)
    if init is not None and (fitted := fit_size(init.width, init.height, caps)) is not None:
        return fitted
    return parse_size(caps.default_size)


def aspect_size(ratio: str, long_side: int | None, caps: Capabilities) -> tuple[int, int]:
    """The size this offering makes for an aspect ratio at a resolution (the long side; default: its default
    size's): of its fixed sizes, the nearest ratio (then the nearest long side); else the ratio at that long
    side, rounded to its multiple and kept within its limits."""
    rw, rh = parse_ratio(ratio)
    dw, dh = parse_size(caps.default_size)
    target = long_side or max(dw, dh)
    if caps.sizes:
        return min((parse_size(s) for s in caps.sizes),
                   key=lambda s: (round(abs(math.log((s[0] / s[1]) / (rw / rh))), 3), abs(max(s) - target)))
    rule = caps.size_rule
    assert rule is not None
    long = min(target, rule.max_side)
    w, h = (long, long * rh / rw) if rw >= rh else (long * rw / rh, long)
    if rule.max_megapixels and w * h > rule.max_megapixels * 1e6:
        scale = math.sqrt(rule.max_megapixels * 1e6 / (w * h))
        w, h = w * scale, h * scale
    m = rule.multiple_of
    near = tuple(max(rule.min_side, min(rule.max_side, round(v / m) * m)) for v in (w, h))
    if caps.size_problem(*near) is None:
        return near  # type: ignore[return-value]
    return tuple(max(rule.min_side, int(v // m) * m) for v in (w, h))  # type: ignore[return-value]


def fit_size(width: int, height: int, caps: Capabilities) -> tuple[int, int] | None:
    """The size nearest to WxH that the offering makes, keeping the aspect ratio: WxH itself, else scaled
    down within its size rule (rounded down to its multiple), else the offered size of the nearest aspect
    ratio; None when nothing fits."""
    if caps.size_problem(width, height) is None:
        return width, height
    if caps.sizes:
        return min((parse_size(s) for s in caps.sizes), key=lambda s: abs(math.log((s[0] / s[1]) / (width / height))))
    rule = caps.size_rule
    assert rule is not None
    scale = min(1.0, rule.max_side / max(width, height),
                math.sqrt(rule.max_megapixels * 1e6 / (width * height)) if rule.max_megapixels else 1.0)
    w, h = (max(rule.min_side, int(v * scale) // rule.multiple_of * rule.multiple_of) for v in (width, height))
    return (w, h) if caps.size_problem(w, h) is None else None


PerImagePrice.model_rebuild()
