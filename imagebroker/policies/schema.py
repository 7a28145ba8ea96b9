"""The policy: what is allowed (hard constraints) and what is preferred (objective, prefer), in YAML."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class When(_Strict):
    """A rule matches when every condition given here holds."""

    tags: dict[str, str] = Field(default_factory=dict)
    size: str | None = None
    min_n: int | None = None
    adapters: bool | None = None
    model: str | None = None
    negative_prompt: bool | None = None


class RuleSet(_Strict):
    constraints: Constraints | None = None   # only the keys given here override the defaults
    objective: Objective | None = None
    prefer: tuple[str, ...] | None = None
    deny: tuple[str, ...] | None = None


class Rule(_Strict):
    name: str
    when: When = Field(default_factory=When)
    set: RuleSet = Field(default_factory=RuleSet)


class ProviderSettings(_Strict):
    enabled: bool = True
    api_key_env: str | None = None
    base_url: str | None = None
    region: str | None = None          # a region option of the provider's offerings (eu, us)
    timeout_s: float | None = Field(default=None, gt=0)
    poll_interval_s: float | None = Field(default=None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)   # provider-specific (ComfyUI workflow, ...)


class LocalModel(_Strict):
    source: str                      # builtin:NAME, a Diffusers folder, a .safetensors file, or a Hub id
    family: Literal["sd", "sdxl", "flux", "sd3"] | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    variant: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    license: dict[str, str] | None = None


class CacheSettings(_Strict):
    max_models: int = Field(default=2, ge=1)
    max_memory_gb: float | None = Field(default=None, gt=0)


class CoalesceSettings(_Strict):
    enabled: bool = True
    max_batch: int = Field(default=8, ge=1, le=64)
    window_ms: float = Field(default=5.0, ge=0)


class LocalSettings(_Strict):
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    gpu_usd_per_hour: Decimal | None = Field(default=None, ge=0)
    cpu_usd_per_hour: Decimal = Field(default=Decimal(0), ge=0)
    energy_usd_per_kwh: Decimal | None = Field(default=None, ge=0)
    charge_load_time: bool = False
    compile: bool = False
    cpu_offload: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    attention_backend: str | None = None
    cache: CacheSettings = Field(default_factory=CacheSettings)
    coalesce: CoalesceSettings = Field(default_factory=CoalesceSettings)
    models: dict[str, LocalModel] = Field(default_factory=dict)


class BudgetScope(_Strict):
    tags: dict[str, str] = Field(default_factory=dict)
    provider: str | None = None
    offering: str | None = None


class Budget(_Strict):
    name: str
    period: Literal["day", "week", "month", "total"]
    limit_usd: Decimal = Field(ge=0)
    scope: BudgetScope = Field(default_factory=BudgetScope)
    on_exceed: Literal["reject", "restrict"] = "reject"


class RetrySettings(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=10)    # per offering, first try included
    initial_delay_s: float = Field(default=0.5, ge=0)
    max_delay_s: float = Field(default=8.0, ge=0)
    max_retry_after_s: float = Field(default=30.0, ge=0)  # a longer Retry-After moves to the next offering


class FallbackSettings(_Strict):
    enabled: bool = True
    max_offerings: int = Field(default=5, ge=1)


class BreakerSettings(_Strict):
    failure_threshold: int = Field(default=5, ge=1)
    cooldown_s: float = Field(default=30.0, ge=0)


class LedgerSettings(_Strict):
    url: str | None = None
    store_prompts: bool = False
    reservation_ttl_s: float = Field(default=900.0, gt=0)


class Policy(_Strict):
    name: str = "custom"
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
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    offerings: tuple[dict[str, Any], ...] = ()   # catalog additions and overrides

    def provider(self, name: str) -> ProviderSettings:
        return self.providers.get(name) or ProviderSettings()
