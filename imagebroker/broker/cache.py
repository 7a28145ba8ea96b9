"""The deterministic cache: a repeat of a seeded request to an offering the catalog marks deterministic
(local models, ComfyUI) is answered from the image store at $0, recorded as a call with `cached` set and
what the call it repeats cost, and never counted against a budget.

Its key is everything that changes the pixels: the offering, its model (source, version, workflow) and the
weights' files as they are on disk (name, size, mtime), every request field that reaches the model, and
each LoRA file's contents. A new adapter file, new weights or another workflow is a miss."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..policies.schema import Policy
from ..providers.offering import Offering
from ..types import Cost, GeneratedImage, ImageRequest, ImageResult, Plan
from .images import ImageStore
from .ledger.lookups import ServedCall
from .ledger.schema import from_nusd
from .ledger.store import Ledger
from .validate import describe

PIXEL_FIELDS = ("prompt", "negative_prompt", "width", "height", "aspect_ratio", "resolution", "n", "seed",
                "steps", "guidance_scale", "scheduler", "quality", "output_format", "background")
MODEL_SETTINGS = ("source", "version", "family", "dtype", "variant", "steps", "guidance_scale", "scheduler",
                  "workflow", "bindings", "quantization", "quantization_backend", "base")
MAX_FINGERPRINT_FILES = 2_000


def _tree_fingerprint(path: str) -> str:
    """A folder's or file's names, sizes and modification times (not its bytes: weights are gigabytes).
    Read on every keyed call, not memoised: weights replaced inside a folder leave the folder's own
    time as it was."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())[:MAX_FINGERPRINT_FILES]
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(root) if f != root else f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _hub_revision(repo: str) -> str | None:
    """The revision of a Hugging Face repo in the local cache (what `refs/main` points at), if downloaded."""
    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    cache = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    ref = cache / f"models--{repo.replace('/', '--')}" / "refs" / "main"
    try:
        return "rev:" + ref.read_text().strip()
    except OSError:
        return None


def _fingerprint(ref: object) -> str | None:
    """What a model source or a workflow names, as it is now: a file or folder by its files' names, sizes
    and times, a Hub id by its cached revision, a built-in model by its folder."""
    if not isinstance(ref, str):
        return None
    if ref.startswith("builtin:"):
        path = Path(__file__).resolve().parents[1] / "local_backend" / "models" / ref.removeprefix("builtin:")
    else:
        path = Path(ref).expanduser()
    if path.exists():
        return _tree_fingerprint(str(path.resolve()))
    return _hub_revision(ref) if ref.count("/") == 1 else None


@lru_cache(maxsize=512)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_digest(ref: str) -> str | None:
    """A LoRA file by its contents (a retrained one is a miss; hashed once per size and time), a folder or
    Hub id as `_fingerprint` has it."""
    path = Path(ref).expanduser()
    if path.is_file():
        st = path.stat()
        return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)
    return _fingerprint(ref)


def cache_key(request: ImageRequest, offering: Offering, policy: Policy) -> str | None:
    """The key a request is answered from the cache by, or None when it cannot be: the cache is off, no
    seed was given, the offering is not deterministic or not one the policy's cache covers."""
    cfg = policy.cache
    if not cfg.enabled or request.seed is None or not offering.deterministic:
        return None
    if cfg.offerings and not any(fnmatch.fnmatchcase(offering.id, p) for p in cfg.offerings):
        return None
    provider = policy.provider(offering.provider)
    settings = {k: offering.settings.get(k) for k in MODEL_SETTINGS if offering.settings.get(k) is not None}
    settings.update({k: v for k, v in provider.options.items() if k in MODEL_SETTINGS})
    canonical: dict[str, Any] = {
        "offering": offering.id, "model": settings, "endpoint": provider.base_url,
        "files": {k: _fingerprint(settings[k]) for k in ("source", "workflow") if k in settings},
        "request": {f: getattr(request, f) for f in PIXEL_FIELDS}, "extra": request.extra,
        "adapters": [(a.ref, a.scale, adapter_digest(a.ref)) for a in request.adapters],
    }
    if request.control:   # (only with control, likewise): the controls, and the ControlNets' weights as they are
        nets = dict(offering.settings.get("controlnets") or {})  # type: ignore[call-overload]
        canonical["control"] = [(*c.key(), nets.get(c.kind), _fingerprint(nets.get(c.kind))) for c in request.control]
    if request.image_prompts:   # likewise the IP-Adapter's weights and image encoder
        ip = dict(offering.settings.get("ip_adapter") or {})  # type: ignore[call-overload]
        canonical["image_prompts"] = [p.key() for p in request.image_prompts]
        canonical["ip_adapter"] = {**ip, "files": [_fingerprint(ip.get(k)) for k in ("source", "image_encoder")]}
    if request.is_edit:   # (only for edits: the keys of text-to-image calls made before edits stay valid)
        canonical["edit"] = {"inputs": [i.sha256 for i in request.images], "strength": request.strength,
                             "mask": request.mask.sha256 if request.mask else None}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()


def read_back(store: ImageStore, hashes: list[str], seed: int | None) -> tuple[GeneratedImage, ...] | None:
    """A call's images from the store, seeds counting up from its own, or None unless every one is there."""
    images = []
    for i, sha in enumerate(hashes):
        data = store.get(sha)
        if data is None:
            return None
        fmt, width, height, c2pa = describe(data)
        images.append(GeneratedImage(data=data, format=fmt, width=width, height=height,  # type: ignore[arg-type]
                                     seed=None if seed is None else seed + i, c2pa=c2pa))
    return tuple(images)


def lookup(ledger: Ledger, store: ImageStore, key: str, since: float
           ) -> tuple[str, tuple[GeneratedImage, ...], Cost, int] | None:
    """The call a key was first served by, since `since`: its request id, its images read back from the
    store (every one, or None), a $0 `cached` cost naming it, and what it cost (nano-USD)."""
    found = ledger.cache_entry(key, since)
    if found is None:
        return None
    request_id, cost_nusd, unit = found.request_id, found.cost_nusd, found.cost_unit
    images = read_back(store, found.image_sha256s, found.seed)
    if images is None:
        return None
    paid = from_nusd(cost_nusd) if cost_nusd is not None else None
    detail = (f"answered from the cache: the same request was served by call {request_id}"
              + (f" for ${paid}" if paid is not None else ""))
    cost = Cost(usd=Decimal(0), status="cached", unit=unit or "cached", units={"cached_from": request_id},
                detail=detail)
    return request_id, images, cost, cost_nusd or 0


def replay(store: ImageStore, served: ServedCall, plan: Plan) -> ImageResult | None:
    """The images an idempotency key was already served with, read back from the store (same request id,
    same bytes), or None when the store does not have every one of them."""
    images = read_back(store, served.image_sha256s, served.seed)
    if images is None:
        return None
    usd = from_nusd(served.cost_nusd) if served.cost_nusd is not None else None
    status = served.cost_status or ("unpriced" if usd is None else "priced")
    cost = Cost(usd=usd, status=status, unit=served.cost_unit or "", units={"replayed_from": served.request_id},  # type: ignore[arg-type]
                detail=f"replayed: the images call {served.request_id} paid for once")
    return ImageResult(request_id=served.request_id, images=images, offering=served.offering, cost=cost,
                       latency_s=served.latency_s or 0.0, plan=plan, attempts=(),
                       applied={"offering": served.offering, "replayed_from": served.request_id})
