"""Pricing as pure functions: `estimate` before a call, `settle` from the provider's reported units after.

Every function returns a `Cost` whose status says how it was reached: `priced` from units the provider
reported (tokens, seconds, credits, images it returned), `estimated` from the catalog's formula, or
`unpriced` when no price is known. Nothing is ever a silent $0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from ..providers.offering import (
    GpuSecondsPrice,
    Offering,
    PerCreditPrice,
    PerImagePrice,
    PerMegapixelPrice,
    PerSecondPrice,
    PerTokenPrice,
    request_size,
)
from ..types import Cost, ImageRequest, parse_size

PLACES = Decimal("1e-9")  # the ledger stores integer nano-USD
CHARS_PER_TOKEN = 4  # prompt-token estimate before the call; `usage` settles the real count


def _q(value: Decimal) -> Decimal:
    return value.quantize(PLACES).normalize() if value else Decimal(0)


def _per_image_usd(price: PerImagePrice, size: str, quality: str | None) -> Decimal:
    """The table row for this size and quality, else one naming only the size or the quality, else
    the base price. An unspecified (or `auto`) quality is priced as medium."""
    q = quality if quality not in (None, "auto") else "medium"
    for match in (lambda r: r.size == size and r.quality == q,
                  lambda r: r.size == size and r.quality is None,
                  lambda r: r.size is None and r.quality == q):
        for row in price.table:
            if match(row):
                return row.usd
    return price.usd


def megapixel_usd(price: PerMegapixelPrice, width: int, height: int) -> Decimal:
    mp = Decimal(width * height) / Decimal(1_000_000)
    if price.rounding == "ceil":
        mp = Decimal(math.ceil(mp))
    if price.first_mp_usd is not None:
        return price.first_mp_usd + max(Decimal(0), mp - 1) * price.usd_per_mp
    return mp * price.usd_per_mp


def megapixel_rate(price: PerMegapixelPrice) -> str:
    """The rate as a person reads it: `$0.03 first MP + $0.015/MP (ceil)`, not `$0.015/MP` alone."""
    first = f"${price.first_mp_usd} first MP + " if price.first_mp_usd is not None else ""
    return f"{first}${price.usd_per_mp}/MP ({price.rounding})"


def estimated_output_tokens(price: PerTokenPrice, width: int, height: int, quality: str | None) -> int:
    table = price.output_tokens
    key = quality if quality in table else "auto" if "auto" in table else "medium"
    base = table.get(key) or max(table.values(), default=0)
    rw, rh = parse_size(price.output_tokens_size)
    return math.ceil(base * (width * height) / (rw * rh))


def input_megapixels(price: PerMegapixelPrice, sizes: list[tuple[int, int]]) -> Decimal:
    """The megapixels of the input images an edit is billed for (FLUX.2: each at `input_usd_per_mp`)."""
    total = Decimal(0)
    for w, h in sizes:
        mp = Decimal(w * h) / Decimal(1_000_000)
        total += Decimal(math.ceil(mp)) if price.rounding == "ceil" else mp
    return total


def _input_usd(price: PerMegapixelPrice, sizes: list[tuple[int, int]]) -> Decimal:
    return input_megapixels(price, sizes) * price.input_usd_per_mp if price.input_usd_per_mp else Decimal(0)


def _input_sizes(request: ImageRequest) -> list[tuple[int, int]]:
    return [(i.width, i.height) for i in request.images]


def token_usd(price: PerTokenPrice, units: Mapping[str, Any]) -> Decimal:
    def rate(name: str, fallback: Decimal) -> Decimal:
        value = getattr(price, name)
        return value if value is not None else fallback

    return (
        Decimal(units.get("input_text_tokens", 0)) * price.text_input
        + Decimal(units.get("cached_input_text_tokens", 0)) * rate("cached_text_input", price.text_input)
        + Decimal(units.get("input_image_tokens", 0)) * price.image_input
        + Decimal(units.get("cached_input_image_tokens", 0)) * rate("cached_image_input", price.image_input)
        + Decimal(units.get("output_image_tokens", 0)) * price.image_output
        + Decimal(units.get("output_text_tokens", 0)) * price.text_output
    )


def _gpu_rate(price: GpuSecondsPrice, device: str) -> Decimal | None:
    return price.cpu_usd_per_hour if device == "cpu" else price.usd_per_gpu_hour


def _preview_tokens(request: ImageRequest, offering: Offering, price: PerTokenPrice) -> int:
    """The image-output tokens of the previews an offering that streams them will send (`partial_images`)."""
    return price.partial_image_tokens * min(request.partial_images, offering.capabilities.partial_images)


def _with_uplift(usd: Decimal, uplift: Decimal) -> Decimal:
    return usd * (1 + uplift) if uplift else usd


def estimate(request: ImageRequest, offering: Offering, *, device: str = "cuda") -> Cost:
    """What the call should cost, before it is made. Status `estimated`, or `unpriced`."""
    price = offering.price
    if price is None:
        return Cost.unpriced("none", f"no price in the catalog for {offering.id}")
    w, h = request_size(request, offering)
    n = request.n
    units: dict[str, Any] = {"images": n, "width": w, "height": h}
    if isinstance(price, PerImagePrice):
        each = _per_image_usd(price, f"{w}x{h}", request.quality)
        usd, detail = each * n, f"{n} x ${each}/image"
    elif isinstance(price, PerMegapixelPrice):
        each = megapixel_usd(price, w, h)
        usd, detail = each * n, f"{n} x {w}x{h} at {megapixel_rate(price)}"
        inputs = _input_sizes(request)
        if price.input_usd_per_mp and inputs:
            usd += _input_usd(price, inputs)
            detail += (f" + {len(inputs)} input image(s), {input_megapixels(price, inputs)} MP at "
                       f"${price.input_usd_per_mp}/MP")
    elif isinstance(price, PerTokenPrice):
        out = estimated_output_tokens(price, w, h, request.quality) + _preview_tokens(request, offering, price)
        prompt = math.ceil(len(request.prompt) / CHARS_PER_TOKEN)
        units.update(input_text_tokens=prompt * n, output_image_tokens=out * n)
        detail = f"~{prompt} prompt + {out} image tokens per image"
        if request.is_edit:   # the input images are sent once, whatever n is
            units["input_image_tokens"] = price.input_image_tokens * len(request.images)
            detail += f" + ~{units['input_image_tokens']} input-image tokens"
        usd = token_usd(price, units)
    elif isinstance(price, PerSecondPrice):
        secs = price.typical_seconds * n
        units["predict_time_s"] = secs
        usd, detail = Decimal(str(secs)) * price.usd_per_second, f"~{secs:g} s on {price.hardware}"
    elif isinstance(price, PerCreditPrice):
        usd, detail = price.credits * n * price.usd_per_credit, f"{n} x {price.credits} credits"
    else:
        rate = _gpu_rate(price, device)
        dw, dh = parse_size(offering.capabilities.default_size)
        secs = price.typical_seconds * n * (w * h) / (dw * dh)
        default_steps = offering.settings.get("steps")
        if request.steps and isinstance(default_steps, int) and default_steps:
            secs *= request.steps / default_steps
        if request.is_edit and offering.kind == "local":  # Diffusers runs int(steps x strength) of the
            secs *= request.edit_strength                  # steps (ComfyUI's KSampler runs them all)
        units.update(gpu_seconds=round(secs, 3), device=device)
        if rate is None:
            return Cost.unpriced("gpu_seconds", "set local.gpu_usd_per_hour in the policy", units)
        usd = Decimal(str(secs)) * rate / 3600
        detail = f"~{secs:.2f} s on {device} at ${rate}/h"
    return Cost(usd=_q(_with_uplift(usd, price.uplift)), status="estimated", unit=price.unit,
                units=units, detail=detail)


def _per_image_bound(price: PerImagePrice, size: str, quality: str | None) -> Decimal:
    """The dearest price this size can be billed at: the asked quality's, or with quality auto (or
    none), the dearest quality's the offering could pick."""
    if quality not in (None, "auto"):
        return _per_image_usd(price, size, quality)
    rows = [r.usd for r in price.table if r.size in (size, None) and r.quality is not None]
    return max([_per_image_usd(price, size, None), *rows])


def bound(request: ImageRequest, offering: Offering, *, device: str = "cuda") -> Decimal | None:
    """The most this call can cost, which budgets reserve: quality `auto` at the dearest quality the
    offering could pick, prompt tokens at one per byte (a token is at least one byte), per-second
    prices at the declared maximum (or the offering's latency p95), local and ComfyUI seconds at the
    latency p95; `n` included. None when unpriced."""
    price = offering.price
    if price is None:
        return None
    w, h = request_size(request, offering)
    n = request.n
    if isinstance(price, PerImagePrice):
        usd = _per_image_bound(price, f"{w}x{h}", request.quality) * n
    elif isinstance(price, PerMegapixelPrice):
        usd = megapixel_usd(price, w, h) * n + _input_usd(price, _input_sizes(request))
    elif isinstance(price, PerTokenPrice):
        worst = request.quality if request.quality in price.output_tokens else None
        table = price.output_tokens if worst is None else {worst: price.output_tokens[worst]}
        rw, rh = parse_size(price.output_tokens_size)
        out = math.ceil(max(table.values(), default=0) * (w * h) / (rw * rh)) + _preview_tokens(request, offering,
                                                                                                price)
        per_input = price.input_image_tokens_max
        per_input = price.input_image_tokens * 2 if per_input is None else per_input
        units = {"input_text_tokens": len(request.prompt.encode()) * n, "output_image_tokens": out * n,
                 "input_image_tokens": per_input * len(request.images)}
        usd = token_usd(price, units)
    elif isinstance(price, PerSecondPrice):
        secs = max(price.max_seconds or offering.latency.p95_s, price.typical_seconds) * n
        usd = Decimal(str(secs)) * price.usd_per_second
    elif isinstance(price, PerCreditPrice):
        usd = price.credits * n * price.usd_per_credit
    else:
        rate = _gpu_rate(price, device)
        expected = estimate(request, offering, device=device)
        if rate is None or expected.usd is None:
            return None
        ratio = Decimal(str(max(1.0, offering.latency.p95_s / max(offering.latency.p50_s, 1e-9))))
        return _q(expected.usd * ratio)
    return _q(_with_uplift(usd, price.uplift))


def settle(usage: Mapping[str, Any], offering: Offering, request: ImageRequest) -> Cost:
    """What the call cost, from the units the provider reported (`usage`)."""
    price = offering.price
    units = dict(usage)
    if price is None:
        return Cost.unpriced("none", f"no price in the catalog for {offering.id}", units)
    if units.get("billed_usd") is not None:   # the provider said what it charged (xAI's cost ticks)
        billed = Decimal(str(units["billed_usd"]))
        return Cost(usd=_q(billed), status="priced", unit=price.unit, units=units,
                    detail=f"${_q(billed)} as billed by the provider")
    images = int(units.get("images", request.n))
    w = int(units.get("width") or request_size(request, offering)[0])
    h = int(units.get("height") or request_size(request, offering)[1])
    status = "priced"
    if isinstance(price, PerImagePrice):
        each = _per_image_usd(price, f"{w}x{h}", units.get("quality") or request.quality)
        usd, detail = each * images, f"{images} x ${each}/image"
    elif isinstance(price, PerMegapixelPrice):
        sizes = units.get("sizes") or [[w, h]] * images
        usd = sum((megapixel_usd(price, int(a), int(b)) for a, b in sizes), Decimal(0))
        detail = f"{len(sizes)} image(s) at {megapixel_rate(price)}"
        inputs = [(int(a), int(b)) for a, b in units.get("input_sizes") or _input_sizes(request)]
        if price.input_usd_per_mp and inputs:
            usd += _input_usd(price, inputs)
            detail += f" + {len(inputs)} input image(s), {input_megapixels(price, inputs)} MP at " \
                      f"${price.input_usd_per_mp}/MP"
    elif isinstance(price, PerTokenPrice):
        if not any(k.endswith("_tokens") for k in units):
            est = estimate(request, offering)
            return est.model_copy(update={"detail": "provider reported no token usage; " + est.detail})
        usd, detail = token_usd(price, units), "from reported token usage"
    elif isinstance(price, PerSecondPrice):
        if units.get("predict_time_s") is None:
            est = estimate(request, offering)
            return est.model_copy(update={"detail": "no predict_time reported; " + est.detail})
        secs = Decimal(str(units["predict_time_s"]))
        usd, detail = secs * price.usd_per_second, f"{secs} s x ${price.usd_per_second}/s ({price.hardware})"
    elif isinstance(price, PerCreditPrice):
        reported = units.get("credits")
        credits = Decimal(str(reported)) if reported is not None else price.credits * images
        usd, detail = credits * price.usd_per_credit, f"{credits} credits x ${price.usd_per_credit}"
    else:
        device = str(units.get("device", "cuda"))
        rate = _gpu_rate(price, device)
        if units.get("gpu_seconds") is None:
            return Cost.unpriced("gpu_seconds", "no busy seconds were measured", units)
        if rate is None:
            return Cost.unpriced("gpu_seconds", "set local.gpu_usd_per_hour in the policy", units)
        secs = Decimal(str(units["gpu_seconds"]))
        usd, detail = secs * rate / 3600, f"{secs} s on {device} at ${rate}/h"
        if price.energy_usd_per_kwh is not None and units.get("energy_j") is not None:
            kwh = Decimal(str(units["energy_j"])) / Decimal(3_600_000)
            usd += kwh * price.energy_usd_per_kwh
            detail += f" + {kwh:.6f} kWh at ${price.energy_usd_per_kwh}/kWh"
    return Cost(usd=_q(_with_uplift(usd, price.uplift)), status=status, unit=price.unit, units=units,
                detail=detail)


IMPLAUSIBLE_FACTOR = 10  # reported usage priced at more than this times the estimate is not believed
_COUNTED = ("images", "width", "height", "predict_time_s", "credits", "gpu_seconds", "energy_j", "billed_usd")


def _not_a_count(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    try:
        d = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return True
    return not d.is_finite() or d < 0


def usage_problem(usage: Mapping[str, Any]) -> str | None:
    """Why the reported units cannot be believed (negative, NaN, infinite, not a number), or None."""
    for key, value in usage.items():
        if key in _COUNTED or key.endswith("_tokens"):
            if value is not None and _not_a_count(value):
                return f"{key}={str(value)[:40]!r}"
        elif key in ("sizes", "input_sizes") and (not isinstance(value, list) or any(
                not isinstance(pair, (list, tuple)) or len(pair) != 2 or any(map(_not_a_count, pair))
                for pair in value)):
            return f"sizes={str(value)[:40]!r}"
    return None


def settle_checked(usage: Mapping[str, Any], offering: Offering, request: ImageRequest,
                   worst: Decimal | None) -> Cost:
    """`settle`, but usage is checked before it is believed: negative, NaN, infinite or non-numeric
    units, or units priced at more than IMPLAUSIBLE_FACTOR times the bound `worst` (for a provider's
    own report; locally measured seconds are ours), give the catalog's estimate instead, with the raw
    units kept and the reason in the detail. Never raises: the provider was paid, the images are kept."""
    why = usage_problem(usage)
    cost = None
    if why is None:
        try:
            cost = settle(usage, offering, request)
        except (ArithmeticError, ValueError, TypeError) as exc:  # a shape `settle` does not expect
            why = f"{type(exc).__name__} pricing {dict(usage)!r:.80}"
    if cost is not None:
        ceiling = worst * IMPLAUSIBLE_FACTOR if worst else None
        hosted = cost.unit != "gpu_seconds"
        if not (hosted and cost.usd is not None and ceiling is not None and cost.usd > ceiling):
            return cost
        why = f"${cost.usd} is over {IMPLAUSIBLE_FACTOR}x the most it could cost (${worst})"
    fallback = estimate(request, offering)
    return fallback.model_copy(update={
        "units": {**fallback.units, "reported": {k: str(v)[:80] for k, v in usage.items()}},
        "detail": f"reported usage not believed ({why}); estimated: {fallback.detail}"})
