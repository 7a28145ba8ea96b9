"""The policy: what is allowed (hard constraints) and what is preferred (objective, prefer), in YAML."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..providers.settings import (
    CacheSettings,
    CoalesceSettings,
    LocalModel,
    LocalProviderSettings,
    LocalSettings,
    ProviderSettings,
)

Objective = Literal["cheapest", "fastest", "best", "ordered"]
LicenseNeed = Literal["commercial", "conditional", "any"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Constraints(_Strict):
    max_cost_per_image_usd: Decimal | None = Field(default=None, ge=0)
    max_cost_per_call_usd: Decimal | None = Field(default=None, ge=0)
    max_latency_s: float | None = Field(default=None, gt=0)
    licenses: LicenseNeed = "any"   # commercial: commercial_use yes; conditional: yes or conditional
    regions: tuple[str, ...] | None = None   # every region an offering processes in must be listed
    require_seed: bool = False
    require_adapters: bool = False
    forbid_control: bool = False      # no request with `control` may go here (e.g. a rule for one app)
    forbid_image_prompts: bool = False   # likewise for `image_prompts` (IP-Adapter)
    require_control: bool = False     # only offerings that can follow a control image (any kind)
    require_image_prompts: bool = False   # only offerings that take image prompts
    split_n: bool = True   # n above an offering's per-call maximum: several calls (false: not eligible)
    # an aspect ratio an offering can only come near (a fixed size table): eligible (nearest) or not (exact)
    size_match: Literal["exact", "nearest"] = "nearest"


class When(_Strict):
    """A rule matches when every condition given here holds."""

    tags: dict[str, str] = Field(default_factory=dict)
    size: str | None = None
    min_n: int | None = None
    adapters: bool | None = None
    model: str | None = None
    negative_prompt: bool | None = None
    edit: bool | None = None      # the request has input images
    mask: bool | None = None      # the request has a mask (inpainting)
    control: bool | None = None   # the request has a control image (ControlNet)
    image_prompts: bool | None = None   # the request has reference images (IP-Adapter)


class RuleSet(_Strict):
    constraints: Constraints | None = None   # only the keys given here override the defaults
    objective: Objective | None = None
    prefer: tuple[str, ...] | None = None
    deny: tuple[str, ...] | None = None


# names the ledger stores, within its column limits and free of NUL, so that nothing is refused by the
# database after a call was paid for
LedgerName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]


class Rule(_Strict):
    name: LedgerName
    when: When = Field(default_factory=When)
    set: RuleSet = Field(default_factory=RuleSet)


class BudgetScope(_Strict):
    tags: dict[str, str] = Field(default_factory=dict)
    provider: str | None = None
    offering: str | None = None


class Budget(_Strict):
    name: LedgerName
    period: Literal["day", "week", "month", "total"]
    limit_usd: Decimal = Field(ge=0)
    scope: BudgetScope = Field(default_factory=BudgetScope)
    on_exceed: Literal["reject", "restrict"] = "reject"


class RetrySettings(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=10)    # per offering, first try included
    initial_delay_s: float = Field(default=0.5, ge=0)
    max_delay_s: float = Field(default=8.0, ge=0)
    max_retry_after_s: float = Field(default=30.0, ge=0)  # a longer Retry-After moves to the next offering
    # the request reached the provider but no answer came back (maybe billed): try the next offering,
    # the same one again (a second paid submit), or stop the call
    on_unknown_outcome: Literal["next", "retry", "stop"] = "next"


class FallbackSettings(_Strict):
    enabled: bool = True
    max_offerings: int = Field(default=5, ge=1)
    # a content refusal is an answer, not an outage: `next` would route around a provider's safety filter
    on_refusal: Literal["stop", "next"] = "stop"


class BreakerSettings(_Strict):
    failure_threshold: int = Field(default=5, ge=1)
    cooldown_s: float = Field(default=30.0, ge=0)


class ImageChecks(_Strict):
    """Limits on what a provider's answer may hold (`broker/validate.py` explains each check)."""

    max_bytes: int = Field(default=64 * 2**20, ge=1)      # per image: above this it is not even parsed
    max_pixels: int = Field(default=64_000_000, ge=1)     # per image, whatever was asked
    max_pixel_ratio: float = Field(default=4.0, gt=0)     # per image, as a multiple of the pixels asked
    max_trailing_zeros: int = Field(default=16, ge=0)     # NUL padding tolerated after an image's end
    max_images_factor: int = Field(default=2, ge=1)       # more than max(n * factor, n + slack) images
    max_images_slack: int = Field(default=4, ge=0)        # in one answer is an error
    decode_pixels: bool = False                           # decode every image in full (slow; see validate.py)

    def max_images(self, n: int) -> int:
        """The most images one answer may carry for `n` asked; the first `n` of them are kept."""
        return max(n * self.max_images_factor, n + self.max_images_slack)


class StoreSettings(_Strict):
    """The image store (`broker/images.py`): on for the command line unless `enabled: false`; for the library
    when `enabled: true`, a `url` or $IMAGEBROKER_STORE_URL is set."""

    url: str | None = Field(default=None, max_length=2000)   # a folder or an fsspec URL (s3://, memory://)
    enabled: bool | None = None
    keep_days: float = Field(default=90.0, gt=0)     # what `imagebroker store gc` keeps


class ResultCache(_Strict):
    """Answer a repeat of a seeded request to a deterministic offering from the store, at $0."""

    enabled: bool = False
    ttl_days: float = Field(default=30.0, gt=0)
    offerings: tuple[str, ...] = ()   # patterns it applies to; empty: every deterministic offering


class StateSettings(_Strict):
    """Where the fast state several workers share lives (`broker/shared.py`): circuit breakers, provider rate
    limits and calls under way by idempotency key. `url: redis://...` (or $IMAGEBROKER_STATE_URL); unset,
    each process keeps its own."""

    url: str | None = Field(default=None, max_length=2000)
    prefix: str = Field(default="imagebroker", min_length=1, max_length=100)   # of every Redis key


class LedgerSettings(_Strict):
    url: str | None = None
    store_prompts: bool = False
    reservation_ttl_s: float = Field(default=900.0, gt=0)


class Policy(_Strict):
    name: LedgerName = "custom"
    description: str = ""
    extends: str | None = None
    constraints: Constraints = Field(default_factory=Constraints)
    objective: Objective = "cheapest"
    prefer: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    last_resort: tuple[str, ...] = ()   # planned only when no other offering is eligible (demo models)
    rules: tuple[Rule, ...] = ()
    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    local: LocalSettings = Field(default_factory=LocalSettings)
    budgets: tuple[Budget, ...] = ()
    retry: RetrySettings = Field(default_factory=RetrySettings)
    fallback: FallbackSettings = Field(default_factory=FallbackSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    timeout_s: float = Field(default=300.0, gt=0)
    images: ImageChecks = Field(default_factory=ImageChecks)
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    cache: ResultCache = Field(default_factory=ResultCache)
    offerings: tuple[dict[str, Any], ...] = ()   # catalog additions and overrides
    # the files it was read from (`_yaml.Located`), so that later checks name their lines
    _located: Any = PrivateAttr(default=None)
    _offerings_located: Any = PrivateAttr(default=None)

    def provider(self, name: str) -> ProviderSettings:
        """The settings a provider is constructed from: its `providers.NAME` section (the local
        provider's with the `local:` section too)."""
        found = self.providers.get(name) or ProviderSettings()
        if name == "local":
            return LocalProviderSettings(**dict(found), local=self.local)
        return found


__all__ = ["CacheSettings", "CoalesceSettings", "LocalModel", "LocalSettings", "Policy", "ProviderSettings"]
