"""The catalog as one policy sees it: provider regions pinned, local rates set, local models declared,
and the policy's own offering overrides applied. Pure: data in, data out."""

from __future__ import annotations

from typing import Any

from ..control import MAX_IMAGE_PROMPTS
from ..providers.catalog import Catalog, deep_merge
from ..providers.offering import GpuSecondsPrice, Offering
from .schema import Policy

FAMILY_TEMPLATE = {"sd": "local/sd15", "sdxl": "local/sdxl", "flux": "local/flux-schnell",
                   "sd3": "local/sdxl"}


def _pin_region(o: Offering, policy: Policy) -> Offering:
    region = policy.provider(o.provider).region
    option = o.region_options.get(region) if region else None
    if option is None:
        return o
    update: dict[str, Any] = {"regions": option.regions}
    if o.price is not None and option.uplift:
        update["price"] = o.price.model_copy(update={"uplift": option.uplift})
    return o.model_copy(update=update)


def _rates(o: Offering, policy: Policy) -> Offering:
    if not isinstance(o.price, GpuSecondsPrice):
        return o
    price = o.price.model_copy(update={"usd_per_gpu_hour": policy.local.gpu_usd_per_hour,
                                       "cpu_usd_per_hour": policy.local.cpu_usd_per_hour,
                                       "energy_usd_per_kwh": policy.local.energy_usd_per_kwh})
    return o.model_copy(update={"price": price})


def _declared_local(name: str, model: Any, catalog: Catalog) -> dict[str, Any]:
    oid = f"local/{name}"
    existing = catalog.resolve(oid)
    family = model.family or (existing.settings.get("family") if existing else None) or "sd"
    base = existing or catalog.resolve(FAMILY_TEMPLATE[family])
    assert base is not None
    settings = dict(base.settings, source=model.source, family=family)
    for key in ("dtype", "variant", "steps", "guidance_scale", "scheduler", "quantization", "base",
                "quantization_backend"):
        value = getattr(model, key)
        if value is not None and value not in ("auto", "none"):
            settings[key] = value
    item: dict[str, Any] = {"id": oid, "provider": "local", "model": name, "settings": settings}
    if existing is None:
        item = deep_merge(base.model_dump(), item)
        item["aliases"] = ()
    if model.license:
        item["license"] = model.license
    if model.controlnets:
        item["capabilities"] = {**item.get("capabilities", {}), "control": tuple(sorted(model.controlnets)),
                                "max_controls": len(model.controlnets)}
        item["settings"] = {**item["settings"], "controlnets": dict(model.controlnets)}
    if model.ip_adapter:
        item["capabilities"] = {**item.get("capabilities", {}), "image_prompts": MAX_IMAGE_PROMPTS}
        item["settings"] = {**item["settings"], "ip_adapter": model.ip_adapter.model_dump()}
    return item


def effective_catalog(policy: Policy, base: Catalog) -> Catalog:
    items = [_declared_local(n, m, base) for n, m in sorted(policy.local.models.items())]
    catalog = base.with_overrides(items) if items else base
    catalog = catalog.with_overrides(list(policy.offerings), policy._offerings_located)
    return Catalog([_rates(_pin_region(o, policy), policy) for o in catalog], catalog.version)
