"""Break-even: a GPU of your own against a hosted price per image, with the arithmetic shown.

With H = 730 hours a month and utilisation U (the share of the GPU's hours that make images):

    self-hosted marginal cost per image = gpu $/h x seconds per image / 3600 / U
    dedicated GPU per month             = gpu $/h x H + fixed $/month
    capacity per GPU-month               = H x 3600 / seconds per image x U
    break-even images per month          = dedicated GPU per month / hosted price per image

Above the break-even volume a dedicated GPU is cheaper than the API; when that volume exceeds one GPU's
capacity, more GPUs are needed (and each adds its own month), which this says too."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from ..errors import RequestError

HOURS_PER_MONTH = Decimal(730)
CENT = Decimal("0.000001")


@dataclass(frozen=True)
class BreakEven:
    hosted_usd_per_image: Decimal
    gpu_usd_per_hour: Decimal
    seconds_per_image: Decimal
    utilisation: Decimal
    fixed_usd_per_month: Decimal
    monthly_images: int | None = None   # the ledger's own volume, to say which side of the line it is on
    seconds_from: str = ""              # where the seconds per image come from, when not given by hand

    def __post_init__(self) -> None:
        if not self.hosted_usd_per_image > 0:
            raise RequestError("the hosted price per image must be above $0 for a break-even to exist")
        if not self.gpu_usd_per_hour >= 0 or not self.seconds_per_image > 0:
            raise RequestError("the GPU's $/hour must be >= 0 and the seconds per image > 0")
        if not 0 < self.utilisation <= 1:
            raise RequestError(f"utilisation {self.utilisation} must be above 0 and at most 1")

    @property
    def self_hosted_usd_per_image(self) -> Decimal:
        return self.gpu_usd_per_hour * self.seconds_per_image / 3600 / self.utilisation

    @property
    def dedicated_gpu_usd_per_month(self) -> Decimal:
        return self.gpu_usd_per_hour * HOURS_PER_MONTH + self.fixed_usd_per_month

    @property
    def capacity_images_per_gpu_month(self) -> int:
        return math.floor(HOURS_PER_MONTH * 3600 / self.seconds_per_image * self.utilisation)

    @property
    def breakeven_images_per_month(self) -> int:
        return math.ceil(self.dedicated_gpu_usd_per_month / self.hosted_usd_per_image)

    @property
    def gpus_needed_at_breakeven(self) -> int:
        return max(1, math.ceil(self.breakeven_images_per_month / max(1, self.capacity_images_per_gpu_month)))

    def hosted_usd(self, images: int) -> Decimal:
        return self.hosted_usd_per_image * images

    def self_hosted_usd(self, images: int) -> Decimal:
        """Dedicated GPUs for `images` a month: as many GPU-months as the volume needs (at least one)."""
        gpus = max(1, math.ceil(images / max(1, self.capacity_images_per_gpu_month)))
        return self.gpu_usd_per_hour * HOURS_PER_MONTH * gpus + self.fixed_usd_per_month

    def verdict(self) -> str | None:
        if self.monthly_images is None:
            return None
        hosted, own = self.hosted_usd(self.monthly_images), self.self_hosted_usd(self.monthly_images)
        side = "a GPU of your own is cheaper" if own < hosted else "the hosted API is cheaper"
        return (f"at this ledger's {self.monthly_images} images in the last 30 days: hosted ${_q(hosted)} vs "
                f"self-hosted ${_q(own)} a month, so {side}")

    def arithmetic(self) -> list[str]:
        g, s, u = self.gpu_usd_per_hour, self.seconds_per_image, self.utilisation
        lines = [f"seconds per image = {s} s, {self.seconds_from}"] if self.seconds_from else []
        lines += [
            f"self-hosted per image = ${g}/h x {s} s / 3600 / {u} = ${_q(self.self_hosted_usd_per_image)}",
            f"dedicated GPU per month = ${g}/h x {HOURS_PER_MONTH} h + ${self.fixed_usd_per_month} fixed = "
            f"${_q(self.dedicated_gpu_usd_per_month)}",
            f"capacity per GPU-month = {HOURS_PER_MONTH} h x 3600 / {s} s x {u} = "
            f"{self.capacity_images_per_gpu_month} images",
            f"break-even = ${_q(self.dedicated_gpu_usd_per_month)} / ${self.hosted_usd_per_image} per image = "
            f"{self.breakeven_images_per_month} images a month",
        ]
        if self.gpus_needed_at_breakeven > 1:
            lines.append(f"that is more than one GPU makes: {self.gpus_needed_at_breakeven} GPUs at the break-even "
                         "volume (each adds its month: below one GPU's capacity the API stays cheaper)")
        if (said := self.verdict()) is not None:
            lines.append(said)
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {"hosted_usd_per_image": self.hosted_usd_per_image, "gpu_usd_per_hour": self.gpu_usd_per_hour,
                "seconds_per_image": self.seconds_per_image, "seconds_from": self.seconds_from or None,
                "utilisation": self.utilisation,
                "fixed_usd_per_month": self.fixed_usd_per_month,
                "self_hosted_usd_per_image": _q(self.self_hosted_usd_per_image),
                "dedicated_gpu_usd_per_month": _q(self.dedicated_gpu_usd_per_month),
                "capacity_images_per_gpu_month": self.capacity_images_per_gpu_month,
                "breakeven_images_per_month": self.breakeven_images_per_month,
                "gpus_needed_at_breakeven": self.gpus_needed_at_breakeven,
                "monthly_images": self.monthly_images, "verdict": self.verdict(), "arithmetic": self.arithmetic()}


BENCHMARKED = ("sdxl", "flux")


def benchmark_seconds(path: Path, which: str) -> tuple[Decimal, str]:
    """Seconds per image from `benchmarks/gpu_pipelines.py`'s results file: `sdxl` or `flux` (torch.compile'd,
    the speed a tuned deployment gets) or `sdxl:eager` / `flux:eager`; and a line saying where they come from."""
    kind, _, mode = which.partition(":")
    mode = mode or "compiled"
    if kind not in BENCHMARKED or mode not in ("compiled", "eager"):
        raise RequestError(f"--benchmark {which!r}: one of sdxl, flux, sdxl:eager, flux:eager")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RequestError(f"--benchmark-file {path}: no such file; run benchmarks/gpu_pipelines.py on the GPU, "
                           "or give the file it wrote") from None
    except (OSError, ValueError) as exc:
        raise RequestError(f"--benchmark-file {path}: not a results file ({exc})") from None
    if results.get("tiny"):
        raise RequestError(f"--benchmark-file {path}: results of a --tiny run (a check of the code path on a "
                           "CPU): their seconds mean nothing")
    seconds = (results.get(kind) or {}).get(f"{mode}_s_per_image")
    if not isinstance(seconds, int | float) or seconds <= 0:
        raise RequestError(f"--benchmark-file {path}: no {mode}_s_per_image for {kind}")
    at = f"{results.get('size', '?')}px, {(results.get(kind) or {}).get('steps', '?')} steps"
    return (Decimal(str(seconds)),
            f"{kind} {mode} on {results.get('device', 'an unnamed device')} ({at}; {path.name})")


def gpu_prices() -> dict[str, dict[str, Any]]:
    """The GPU hours `breakeven --gpu NAME` knows (broker/data/gpus.yaml, from the research)."""
    from importlib import resources

    import yaml

    text = (resources.files("imagebroker.broker") / "data" / "gpus.yaml").read_text(encoding="utf-8")
    return dict(yaml.safe_load(text)["gpus"])


def gpu_usd_per_hour(name: str) -> Decimal:
    known = gpu_prices()
    if name not in known:
        raise RequestError(f"--gpu {name!r}: not a GPU price imagebroker knows; known: {', '.join(sorted(known))}")
    return Decimal(str(known[name]["usd_per_hour"]))


def _q(usd: Decimal) -> Decimal:
    return usd.quantize(CENT, rounding=ROUND_HALF_EVEN)
