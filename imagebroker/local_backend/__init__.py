"""The local provider (the code rung): Diffusers pipelines in this process, on this machine's GPU or CPU
(`local.engine: inprocess`, `runner.py`), or served by Ray Serve across a cluster's GPUs (`local.engine: ray`,
`ray_engine.py` calling `ray_serve.py`'s replicas). Both run a batch through the same code (`pipelines.py`).

This module imports nothing heavy: torch, diffusers and ray load only when a local offering is called,
so planning and `import imagebroker` stay fast without the [local] or [ray] extra.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, MissingExtra
from ..providers.base import CallContext, OfferingState, Provider, ProviderResult
from ..providers.offering import Offering
from ..providers.settings import LocalProviderSettings, ProviderSettings
from ..types import ImageRequest
from .sources import MODELS_DIR, detect_device, hub_cache, missing_extra, resolve_source

if TYPE_CHECKING:
    from ..providers.catalog import Catalog
    from .ray_engine import RayEngine
    from .runner import LocalRunner

INSTALLED_TTL_S = 10.0  # how long "is this model on disk?" is trusted before looking again
__all__ = ["MODELS_DIR", "LocalProvider", "detect_device", "hub_cache", "missing_extra", "resolve_source"]


@functools.cache
def has_module(name: str) -> bool:
    """Whether an optional package is installed (asked once per process: the planner asks every second)."""
    return importlib.util.find_spec(name) is not None


def quantization_problem(kind: str, device: str, backend: str = "torchao") -> str | None:
    if kind == "none":
        return None
    if backend == "bitsandbytes":
        if device != "cuda":
            return f"quantization {kind} with bitsandbytes needs CUDA; on {device} use the torchao backend (int8)"
        return None if has_module("bitsandbytes") else \
            f"quantization {kind} with bitsandbytes needs the bitsandbytes package: pip install bitsandbytes"
    if kind == "gguf":
        return None if has_module("gguf") else \
            "quantization gguf needs the gguf package: pip install 'imagebroker[quantization]'"
    if not has_module("torchao"):
        return f"quantization {kind} needs torchao: pip install 'imagebroker[quantization]'"
    if kind == "int4" and device != "cuda":
        return f"quantization int4 needs CUDA (torchao's int4 kernels); on {device} use int8"
    return None


def installed(offering: Offering) -> bool:
    return resolve_source(str(offering.settings.get("source", "")))[1] is not None


class LocalProvider(Provider):
    name = "local"

    settings: LocalProviderSettings

    def __init__(self, settings: ProviderSettings) -> None:
        if not isinstance(settings, LocalProviderSettings):
            settings = LocalProviderSettings(**dict(settings))
        super().__init__(settings)
        self._runner: LocalRunner | None = None
        self._ray: RayEngine | None = None
        self._device = detect_device(settings.local.device)
        self._installed: dict[str, tuple[float, tuple[str, Path | None]]] = {}
        self._offerings: dict[str, Offering] = {}

    @property
    def on_ray(self) -> bool:
        return self.settings.local.engine == "ray"

    @property
    def offerings(self) -> dict[str, Offering]:
        """This policy's local offerings, by model name."""
        return dict(self._offerings)

    def connect(self, peer: Callable[[str], Provider], catalog: Catalog) -> None:
        self._offerings = {o.model: o for o in catalog if o.provider == "local"}

    def state(self, offering: Offering) -> OfferingState:
        if self.on_ray:
            engine = self._ray
            warm = engine is not None and engine.warm(offering.model)
            return OfferingState(unavailable=self.availability(offering), warm=warm,
                                 device=self.settings.local.deployment(offering.model).device)
        warm = self._runner is not None and self._runner.is_loaded(offering)
        return OfferingState(unavailable=self.availability(offering), warm=warm, device=self._device)

    @property
    def state_epoch(self) -> int:
        return self._runner.generation if self._runner is not None else 0

    def availability(self, offering: Offering) -> str | None:
        if not self.settings.enabled:
            return "provider local disabled in the policy"
        if self.on_ray:
            if not has_module("ray"):
                return "local.engine is ray: needs the [ray] extra: pip install 'imagebroker[ray]'"
            if self.settings.local.ray.address:   # the models live on the cluster's disks, not this machine's
                return self._ray.unavailable(offering.model) if self._ray is not None else None
            if self._ray is not None and (why := self._ray.unavailable(offering.model)):
                return why
        if module := missing_extra():
            return f"needs the [local] extra: pip install 'imagebroker[local]' ({module} missing)"
        if why := quantization_problem(str(offering.settings.get("quantization") or "none"),
                                       self.settings.local.deployment(offering.model).device if self.on_ray
                                       else self._device,
                                       str(offering.settings.get("quantization_backend") or "torchao")):
            return why
        source = str(offering.settings.get("source", ""))
        kind, path = self._resolved(source)
        base = offering.settings.get("base")
        if path is not None and base and self._resolved(str(base))[1] is None:
            return f"base model not installed: {base} (the pipeline around {path.name})"
        if path is not None:
            return None
        if kind == "hub":
            return (f"model not installed: download {source} into the Hugging Face cache "
                    f"(hf download {source}) or set local.models.{offering.model}.source to a folder")
        return f"model not installed: {source} not found"

    def _resolved(self, source: str) -> tuple[str, Path | None]:
        """`resolve_source`, trusted for INSTALLED_TTL_S: the planner asks about every second."""
        seen = self._installed.get(source)
        if seen is None or time.monotonic() - seen[0] > INSTALLED_TTL_S:
            seen = self._installed[source] = (time.monotonic(), resolve_source(source))
        return seen[1]

    def runner(self) -> LocalRunner:
        if self._runner is None:
            try:
                from .runner import LocalRunner
            except ImportError as exc:
                raise MissingExtra("local", exc.name or "torch") from None
            self._runner = LocalRunner(self.settings.local, self._device)
        return self._runner

    def ray_engine(self) -> RayEngine:
        if self._ray is None:
            try:
                from .ray_engine import RayEngine
            except ImportError as exc:
                raise MissingExtra("ray", exc.name or "ray") from None
            self._ray = RayEngine(self.settings.local, self.deployed())
        return self._ray

    def deployed(self) -> dict[str, Offering]:
        """The models a Serve application of this policy holds: `local.ray.models`, or else every model the
        policy declares in `local.models` and every other local model installed here."""
        names = self.settings.local.ray.models
        if names is None:
            return {m: o for m, o in self._offerings.items()
                    if m in self.settings.local.models or installed(o)}
        unknown = [n for n in names if n not in self._offerings]
        if unknown:
            raise ConfigError(f"local.ray.models: no local model named {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(self._offerings))})")
        return {n: self._offerings[n] for n in names}

    async def generate(self, request: ImageRequest, offering: Offering,
                       ctx: CallContext) -> ProviderResult:
        if self.on_ray:
            return await self.ray_engine().generate(request, offering, ctx)
        return await self.runner().generate(request, offering, ctx)

    async def aclose(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._ray is not None:
            self._ray.close()
            self._ray = None

    def __getstate__(self) -> dict[str, Any]:  # never pickle pipelines
        raise TypeError("LocalProvider is not picklable")
