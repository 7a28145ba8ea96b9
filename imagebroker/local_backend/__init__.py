"""The local provider (the code rung): Diffusers pipelines in this process, on this machine's GPU or CPU.

This module imports nothing heavy: torch and diffusers load only when a local offering is called
(`runner.py`), so planning and `import imagebroker` stay fast without the [local] extra.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingExtra
from ..policies.schema import Policy, ProviderSettings
from ..providers.base import CallContext, Provider, ProviderResult
from ..providers.offering import Offering
from ..types import ImageRequest

if TYPE_CHECKING:
    from .runner import LocalRunner

MODELS_DIR = Path(__file__).parent / "models"


INSTALLED_TTL_S = 10.0  # how long "is this model on disk?" is trusted before looking again


@functools.cache
def missing_extra() -> str | None:
    """The first [local] dependency that is not installed (checked once per process)."""
    return next((m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None), None)


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def resolve_source(source: str) -> tuple[str, Path | None]:
    """(kind, local path): kind is builtin, dir, file or hub; the path is None when not installed."""
    if source.startswith("builtin:"):
        path = MODELS_DIR / source.removeprefix("builtin:")
        return "builtin", path if (path / "model_index.json").is_file() else None
    path = Path(source).expanduser()
    if source.endswith((".safetensors", ".ckpt", ".gguf")):
        return "file", path if path.is_file() else None
    if path.is_dir() or source.startswith((".", "/", "~")):
        return "dir", path if (path / "model_index.json").is_file() else None
    repo = hub_cache() / f"models--{source.replace('/', '--')}" / "snapshots"
    snapshots = sorted(repo.glob("*/model_index.json")) if repo.is_dir() else []
    return "hub", snapshots[-1].parent if snapshots else None


def detect_device(setting: str) -> str:
    """cuda, then mps, then cpu, decided without importing torch."""
    if setting != "auto":
        return setting
    if Path("/proc/driver/nvidia/version").exists() or os.environ.get("IMAGEBROKER_ASSUME_CUDA"):
        return "cuda"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "mps"
    return "cpu"


class LocalProvider(Provider):
    name = "local"

    def __init__(self, settings: ProviderSettings, policy: Policy) -> None:
        super().__init__(settings, policy)
        self._runner: LocalRunner | None = None
        self._device = detect_device(policy.local.device)
        self._installed: dict[str, tuple[float, tuple[str, Path | None]]] = {}

    def device_kind(self) -> str:
        return self._device

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

    def is_warm(self, offering: Offering) -> bool:
        return self._runner is not None and self._runner.is_loaded(offering)

    def runner(self) -> LocalRunner:
        if self._runner is None:
            try:
                from .runner import LocalRunner
            except ImportError as exc:
                raise MissingExtra("local", exc.name or "torch") from None
            self._runner = LocalRunner(self.policy.local, self._device)
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
