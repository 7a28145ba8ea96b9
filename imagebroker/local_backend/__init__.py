"""The local provider (the code rung): Diffusers pipelines in this process, on this machine's GPU or CPU.

This module imports nothing heavy: torch and diffusers load only when a local offering is called
(`runner.py`), so planning and `import imagebroker` stay fast without the [local] extra.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingExtra
from ..providers.base import CallContext, OfferingState, Provider, ProviderResult
from ..providers.offering import Offering
from ..providers.settings import LocalProviderSettings, ProviderSettings
from ..types import ImageRequest
from .sources import MODELS_DIR, detect_device, hub_cache, missing_extra, resolve_source

if TYPE_CHECKING:
    from .runner import LocalRunner

INSTALLED_TTL_S = 10.0  # how long "is this model on disk?" is trusted before looking again
__all__ = ["MODELS_DIR", "LocalProvider", "detect_device", "hub_cache", "missing_extra", "resolve_source"]


class LocalProvider(Provider):
    name = "local"

    settings: LocalProviderSettings

    def __init__(self, settings: ProviderSettings) -> None:
        if not isinstance(settings, LocalProviderSettings):
            settings = LocalProviderSettings(**dict(settings))
        super().__init__(settings)
        self._runner: LocalRunner | None = None
        self._device = detect_device(settings.local.device)
        self._installed: dict[str, tuple[float, tuple[str, Path | None]]] = {}

    def state(self, offering: Offering) -> OfferingState:
        warm = self._runner is not None and self._runner.is_loaded(offering)
        return OfferingState(unavailable=self.availability(offering), warm=warm, device=self._device)

    @property
    def state_epoch(self) -> int:
        return self._runner.generation if self._runner is not None else 0

    def availability(self, offering: Offering) -> str | None:
        if not self.settings.enabled:
            return "provider local disabled in the policy"
        if module := missing_extra():
            return f"needs the [local] extra: pip install 'imagebroker[local]' ({module} missing)"
        source = str(offering.settings.get("source", ""))
        seen = self._installed.get(source)
        if seen is None or time.monotonic() - seen[0] > INSTALLED_TTL_S:
            seen = self._installed[source] = (time.monotonic(), resolve_source(source))
        kind, path = seen[1]
        if path is not None:
            return None
        if kind == "hub":
            return (f"model not installed: download {source} into the Hugging Face cache "
                    f"(hf download {source}) or set local.models.{offering.model}.source to a folder")
        return f"model not installed: {source} not found"

    def runner(self) -> LocalRunner:
        if self._runner is None:
            try:
                from .runner import LocalRunner
            except ImportError as exc:
                raise MissingExtra("local", exc.name or "torch") from None
            self._runner = LocalRunner(self.settings.local, self._device)
        return self._runner

    async def generate(self, request: ImageRequest, offering: Offering,
                       ctx: CallContext) -> ProviderResult:
        return await self.runner().generate(request, offering, ctx)

    async def aclose(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __getstate__(self) -> dict[str, Any]:  # never pickle pipelines
        raise TypeError("LocalProvider is not picklable")
