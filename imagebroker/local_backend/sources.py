"""Where local models come from and which device runs them, decided without importing torch."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"


@functools.cache
def missing_extra() -> str | None:
    """The first [local] dependency that is not installed (checked once per process)."""
    return next((m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None), None)


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def local_path(source: str) -> Path:
    """`builtin:NAME/...` inside the bundled models, else the path as given (`~` expanded)."""
    if source.startswith("builtin:"):
        return MODELS_DIR / source.removeprefix("builtin:")
    return Path(source).expanduser()


def resolve_source(source: str) -> tuple[str, Path | None]:
    """(kind, local path): kind is builtin, dir, file or hub; the path is None when not installed."""
    path = local_path(source)
    if source.startswith("builtin:"):
        return "builtin", path if (path / "model_index.json").is_file() else None
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
