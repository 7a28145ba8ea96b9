"""The provider protocol: one backend's wire protocol, nothing about policy.

A provider maps an `ImageRequest` onto its API, returns image bytes and the usage units it was billed
in, and translates its failures into `imagebroker.errors` once, in its own module.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..logs import remember_secret
from ..types import ImageRequest, PartialImage, parse_size
from .offering import Offering
from .settings import ProviderSettings

if TYPE_CHECKING:
    from .catalog import Catalog

ProgressCallback = Callable[[int, int], None]          # (step, total steps) while an image is made
AttemptCallback = Callable[[str, int], None]           # (offering id, attempt number) before each try

@dataclass
class Submission:
    """What the call loop learns of one attempt besides its result: whether its request may have reached the
    provider (a submit sent, a job id received; after that a failure is an unknown outcome, maybe billed, not
    a clean one to retry for free), the provider's id for it, and what an attempt that returns no result used
    (a canvas server's seconds on a failed or cancelled run), which is recorded as its cost."""

    sent: bool = False
    request_id: str | None = None
    usage: dict[str, Any] | None = None


_submission: ContextVar[Submission | None] = ContextVar("imagebroker_submission", default=None)


def track_submission() -> Submission:
    """For the call loop: a fresh record for the attempt about to run in this task."""
    record = Submission()
    _submission.set(record)
    return record


def mark_submitted(request_id: str | None = None) -> None:
    """For providers: the request may have reached the provider (it may be billed), under this id."""
    record = _submission.get()
    if record is not None:
        record.sent = True
        record.request_id = request_id or record.request_id


def report_usage(usage: dict[str, Any]) -> None:
    """For providers: what an attempt that will not return a result used (raised or cancelled after it)."""
    record = _submission.get()
    if record is not None:
        record.usage = dict(usage)


def sampling_fields(request: ImageRequest, offering: Offering, *, steps: str, guidance: str,
                    negative_prompt: str | None = "negative_prompt") -> dict[str, Any]:
    """The seed and the sampling fields the offering supports, under the provider's names for them:
    exactly those the planner does not report as dropped (`negative_prompt=None`: never sent)."""
    caps, out = offering.capabilities, {}
    if request.seed is not None:
        out["seed"] = request.seed
    if request.steps and caps.steps:
        out[steps] = request.steps
    if request.guidance_scale is not None and caps.guidance:
        out[guidance] = request.guidance_scale
    if negative_prompt and request.negative_prompt and caps.negative_prompt:
        out[negative_prompt] = request.negative_prompt
    return out


def reported_size(value: Any) -> tuple[int, int] | None:
    """A size a provider's answer states (`"1344x768"`), or None when it is not one."""
    try:
        return parse_size(str(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class OfferingState:
    """What a provider says of one of its offerings: why it cannot be called now (None: it can),
    whether it is warm (loaded, no start-up time), and the device it runs on, where that sets the
    price (a CPU-only server is priced at the CPU rate)."""

    unavailable: str | None = None
    warm: bool = True
    device: str | None = None


@dataclass(frozen=True)
class RawImage:
    data: bytes = field(repr=False)
    seed: int | None = None


@dataclass
class ProviderResult:
    """What came back: image bytes, the billed units (`usage`) and what was actually sent."""

    images: list[RawImage]
    usage: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    applied: dict[str, Any] = field(default_factory=dict)


def preview_receiver(progress: ProgressCallback | None) -> Callable[[PartialImage], None] | None:
    """Where a call's streamed previews go: a `progress` callback that takes a third argument receives each as
    `progress(index, total, partial)`; one of two arguments (steps only) receives none."""
    if progress is None:
        return None
    try:
        params = inspect.signature(progress).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return lambda partial: progress(partial.index, partial.total, partial)   # type: ignore[call-arg]


@dataclass
class CallContext:
    """Per-call settings handed to `Provider.generate`. The key is kept out of repr."""

    timeout_s: float
    api_key: str | None = field(default=None, repr=False)
    progress: ProgressCallback | None = None
    attempt: int = 1
    partial: Callable[[PartialImage], None] | None = None   # where streamed previews go (`partial_images`)


class Provider(ABC):
    """Subclass this, set `name` (and `api_key_env` if it needs a key), implement `generate`.

    Register it under the entry-point group `imagebroker.providers`; the built-ins do the same. Ship its
    offerings beside it as data and name the file in `catalog_file`.
    """

    name: ClassVar[str]
    api_key_env: ClassVar[str | None] = None
    default_base_url: ClassVar[str | None] = None
    # a plugin's own offerings: a catalog file (the built-in files' format) shipped in the provider's package,
    # by its name there; installing the package is then all it takes to route to it
    catalog_file: ClassVar[str | None] = None

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} base_url={self.base_url!r}>"

    @property
    def key_env(self) -> str | None:
        return self.settings.api_key_env or self.api_key_env

    @property
    def base_url(self) -> str | None:
        return (self.settings.base_url or self.default_base_url or "").rstrip("/") or None

    def api_key(self) -> str | None:
        key = os.environ.get(self.key_env) if self.key_env else None
        remember_secret(key)  # masked in every log record from now on
        return key

    def availability(self, offering: Offering) -> str | None:
        """None when the offering can be called now; otherwise the reason, naming the fix."""
        if not self.settings.enabled:
            return f"provider {self.name} disabled in the policy"
        if self.key_env and not self.api_key():
            return f"no API key: set {self.key_env}"
        return None

    def base_url_for(self, offering: Offering) -> str | None:
        """Most specific first: the offering's own base_url, the policy's provider base_url, the
        pinned region's host, the provider's default."""
        if offering.settings.get("base_url"):
            return str(offering.settings["base_url"]).rstrip("/")
        if self.settings.base_url:
            return self.settings.base_url.rstrip("/")
        region = self.settings.region
        option = offering.region_options.get(region) if region else None
        if option and option.base_url:
            return option.base_url.rstrip("/")
        return self.base_url

    def connect(self, peer: Callable[[str], Provider], catalog: Catalog) -> None:
        """Called once by the broker holding this provider, with its other providers by name and the catalog
        as its policy sees it, for a provider that can hand a request on (ComfyUI's local fallback)."""

    def state(self, offering: Offering) -> OfferingState:
        """What the planner needs to know of this offering now. Called for every offering about once a
        second, and again whenever `state_epoch` changes: keep it cheap."""
        return OfferingState(unavailable=self.availability(offering))

    @property
    def state_epoch(self) -> int:
        """Changes whenever `state` may answer differently (a model loaded or unloaded), so the
        planner sees it at once rather than at the next periodic refresh."""
        return 0

    @abstractmethod
    async def generate(self, request: ImageRequest, offering: Offering,
                       ctx: CallContext) -> ProviderResult:
        """Make the images. Raise `imagebroker.errors.ProviderError` subclasses on failure."""

    async def aclose(self) -> None:
        """Release clients, threads and pipelines."""
