"""What a provider is constructed from: its own section of the policy, never the whole policy.

`ProviderSettings` is every provider's `providers.NAME:` section. The local provider also reads the
policy's `local:` section, so it gets `LocalProviderSettings`, which carries it. The policy schema
(`policies/schema.py`) uses these models for those sections; providers import them from here, so
that the provider layer depends on nothing above it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RateLimit(_Strict):
    """How much of a provider this policy may use at once, across every process that shares its state
    (`state.url`): at most `rpm` requests in any 60 s and at most `concurrency` under way. A call waits its
    turn, bounded by its timeout, instead of collecting 429s."""

    rpm: int | None = Field(default=None, ge=1)
    concurrency: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _something(self) -> RateLimit:
        if self.rpm is None and self.concurrency is None:
            raise ValueError("a rate_limit needs rpm, concurrency or both")
        return self

    def __str__(self) -> str:
        parts = [f"{self.rpm} rpm" if self.rpm else "", f"{self.concurrency} at once" if self.concurrency else ""]
        return ", ".join(p for p in parts if p)


class ProviderSettings(_Strict):
    enabled: bool = True
    api_key_env: str | None = None
    base_url: str | None = None
    base_urls: tuple[str, ...] = ()    # several servers of one provider, used as a pool (ComfyUI)
    region: str | None = None          # a region option of the provider's offerings (eu, us)
    timeout_s: float | None = Field(default=None, gt=0)
    poll_interval_s: float | None = Field(default=None, gt=0)
    max_response_bytes: int | None = Field(default=None, ge=1)   # one answer or result (default 128 MiB)
    options: dict[str, Any] = Field(default_factory=dict)   # provider-specific (ComfyUI workflow, ...)
    rate_limit: RateLimit | None = None


class Autoscaling(_Strict):
    """Ray Serve's autoscaling for one deployment: replicas between the bounds, aiming at this many requests
    under way per replica."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is over max_replicas {self.max_replicas}")
        return self


class Deployment(_Strict):
    """How one local model is served on Ray Serve (`local.engine: ray`): its replicas (a fixed number, or
    `autoscaling`), what each replica takes from the cluster (a replica with `num_gpus` runs on CUDA and is
    priced at the GPU rate, one without on CPU at the CPU rate), and custom Ray `resources` to place it
    (e.g. `{accelerator_type:H100: 0.01}` or a resource the team gave its nodes)."""

    replicas: int = Field(default=1, ge=1)
    autoscaling: Autoscaling | None = None
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    max_ongoing_requests: int = Field(default=16, ge=1)
    start_retries: int = Field(default=3, ge=0)   # replica starts that may fail before the deployment has

    @model_validator(mode="after")
    def _one_way(self) -> Deployment:
        if self.autoscaling is not None and "replicas" in self.model_fields_set:
            raise ValueError("set replicas or autoscaling, not both")
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


class RaySettings(_Strict):
    """Where the Ray cluster is and what the Serve application is called. `address` unset starts a Ray
    instance on this machine at the first local call (`num_cpus`, `num_gpus`: what it may use) and deploys
    the models itself; `auto` or `ray://HOST:10001` joins a running cluster, where `imagebroker local deploy`
    put the application."""

    address: str | None = None
    app: str = Field(default="imagebroker", pattern=r"^[A-Za-z0-9_-]+$")
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    models: tuple[str, ...] | None = None     # which local models to deploy (default: every declared one)
    deployment: Deployment = Field(default_factory=Deployment)   # for every model without its own `ray:`


class IpAdapterSettings(_Strict):
    """An IP-Adapter for a local model (image prompts): its weights, a .safetensors/.bin file, or a Hub repo
    in the cache with `weight_name` (and `subfolder`); and the CLIP image encoder it was trained with, a
    folder or a Hub id (h94/IP-Adapter keeps it under `models/image_encoder`: give that folder's path)."""

    source: str
    weight_name: str | None = None
    subfolder: str | None = None
    image_encoder: str


class LocalModel(_Strict):
    source: str                      # builtin:NAME, a Diffusers folder, a .safetensors/.gguf file, or a Hub id
    family: Literal["sd", "sdxl", "flux", "sd3"] | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    variant: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    license: dict[str, str] | None = None
    # the denoiser's weights through torchao: int8 (weight-only, any device) or int4 (weight-only, CUDA);
    # or gguf: `source` is a GGUF file of the denoiser (a FLUX or SD3 transformer), the rest of the pipeline
    # (and the denoiser's config) from `base`. A quantized model is its own offering (declare it under its
    # own name), cached and priced apart
    quantization: Literal["none", "int8", "int4", "gguf"] = "none"
    # int8/int4 through torchao (default), or bitsandbytes (LLM.int8 / NF4; CUDA only, the bitsandbytes package)
    quantization_backend: Literal["torchao", "bitsandbytes"] = "torchao"
    base: str | None = None          # with gguf: the Diffusers folder or Hub id of the same model
    # ControlNets for this model, by control kind: a Diffusers folder, a single file or a Hub id in the cache
    controlnets: dict[str, str] = Field(default_factory=dict)
    ip_adapter: IpAdapterSettings | None = None   # image prompts (one IP-Adapter, once per prompt image)
    ray: Deployment | None = None    # how this model is served with `local.engine: ray`

    @model_validator(mode="after")
    def _gguf(self) -> LocalModel:
        is_gguf = self.source.endswith(".gguf")
        if is_gguf != (self.quantization == "gguf"):
            raise ValueError("a .gguf source is a quantized denoiser: set quantization: gguf (and base)"
                             if is_gguf else "quantization gguf needs a .gguf file as source")
        if self.quantization == "gguf":
            if not self.base:
                raise ValueError("quantization gguf needs base: the Diffusers folder or Hub id the rest of "
                                 "the pipeline comes from")
            if self.family not in ("flux", "sd3"):
                raise ValueError("quantization gguf loads a FLUX or SD3 transformer: set family: flux or sd3")
        elif self.base:
            raise ValueError("base is only for quantization: gguf")
        if self.ip_adapter is not None and self.family not in (None, "sd", "sdxl"):
            raise ValueError(f"ip_adapter: image prompts run on SD and SDXL models here, not {self.family} (FLUX's "
                             "and SD3's IP-Adapters load differently)")
        if self.quantization_backend == "bitsandbytes" and self.quantization not in ("int8", "int4"):
            raise ValueError("quantization_backend bitsandbytes is for quantization: int8 or int4")
        return self


class CacheSettings(_Strict):
    max_models: int = Field(default=2, ge=1)
    max_memory_gb: float | None = Field(default=None, gt=0)


class CoalesceSettings(_Strict):
    enabled: bool = True
    max_batch: int = Field(default=8, ge=1, le=64)
    window_ms: float = Field(default=5.0, ge=0)


class LocalSettings(_Strict):
    engine: Literal["inprocess", "ray"] = "inprocess"   # ray: the models served by Ray Serve (`ray:`)
    ray: RaySettings = Field(default_factory=RaySettings)
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

    def deployment(self, model: str) -> Deployment:
        declared = self.models.get(model)
        return declared.ray if declared is not None and declared.ray is not None else self.ray.deployment


class LocalProviderSettings(ProviderSettings):
    """The local provider's `providers.local:` section together with the policy's `local:` section."""

    local: LocalSettings = Field(default_factory=LocalSettings)
