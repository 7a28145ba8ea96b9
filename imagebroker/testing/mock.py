"""A scriptable in-process provider, so policies and the broker can be tested without any network.

Two ways to script it:

* in Python, with a handler (like httpx's MockTransport):
  `MockProvider.with_handler(fn)` where `fn(request, offering, ctx)` returns a `ProviderResult`,
  raises an `imagebroker.errors` error, or is a coroutine doing either;
* in a policy, with `settings.script` on a `mock/...` offering: a list of steps taken one per call,
  the last repeating. A step is `ok`, `sleep:SECONDS`, `empty` (no images), `broken` (bytes that are
  not an image), `short` (one image fewer than asked) or `error:CLASS[:RETRY_AFTER]` with CLASS from
  `imagebroker.errors` (e.g. `error:RateLimited:1`, `error:ProviderUnavailable`).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from .. import errors
from ..providers.base import CallContext, Provider, ProviderResult, RawImage
from ..providers.offering import Offering, request_size
from ..providers.settings import ProviderSettings
from ..types import ImageRequest
from .images import make_image

Handler = Callable[[ImageRequest, Offering, CallContext],
                   "ProviderResult | Awaitable[ProviderResult]"]


def mock_offering(model: str, **overrides: Any) -> dict[str, Any]:
    """A catalog entry for `mock/<model>`, for a policy's `offerings:` list."""
    item: dict[str, Any] = {
        "provider": "mock", "model": model, "kind": "closed", "regions": ["us"],
        "license": {"commercial_use": "yes", "name": "test"},
        "latency": {"p50_s": 1.0, "p95_s": 2.0}, "source": "test", "checked": "2026-11-22",
        "capabilities": {"default_size": "256x256", "size_rule": {"min_side": 64, "max_side": 2048},
                         "max_n": 10, "seed": True, "negative_prompt": True, "steps": True,
                         "guidance": True, "output_formats": ["png", "jpeg", "webp"]},
        "price": {"unit": "per_image", "usd": "0.01", "source": "test", "checked": "2026-11-22",
                  "confidence": "high"},
    }
    from ..providers.catalog import deep_merge

    return deep_merge(item, overrides)


class MockProvider(Provider):
    name = "mock"
    handler: ClassVar[Handler | None] = None

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        self.calls: dict[str, int] = defaultdict(int)
        self.requests: list[ImageRequest] = []

    @classmethod
    def with_handler(cls, handler: Handler) -> type[MockProvider]:
        return type("ScriptedMockProvider", (cls,), {"handler": staticmethod(handler)})

    async def generate(self, request: ImageRequest, offering: Offering,
                       ctx: CallContext) -> ProviderResult:
        self.requests.append(request)
        self.calls[offering.id] += 1
        if type(self).handler is not None:
            out = type(self).handler(request, offering, ctx)
            return await out if inspect.isawaitable(out) else out
        script = list(offering.settings.get("script") or ["ok"])  # type: ignore[call-overload]
        step = script[min(self.calls[offering.id], len(script)) - 1]
        return await self._step(str(step), request, offering)

    async def _step(self, step: str, request: ImageRequest, offering: Offering) -> ProviderResult:
        kind, _, arg = step.partition(":")
        if kind == "sleep":
            await asyncio.sleep(float(arg))
            return ok_result(request, offering)
        if kind == "error":
            cls_name, _, retry_after = arg.partition(":")
            cls = getattr(errors, cls_name)
            kw: dict[str, Any] = {"provider": "mock", "offering": offering.id}
            if cls is errors.RateLimited:
                kw["retry_after"] = float(retry_after) if retry_after else None
                kw["status"] = 429
            raise cls(f"scripted {cls_name}", **kw)
        result = ok_result(request, offering)
        if kind == "empty":
            result.images = []
        elif kind == "broken":
            result.images = [RawImage(b"this is not an image", None) for _ in result.images]
        elif kind == "short":
            result.images = result.images[:-1]
        return result


def ok_result(request: ImageRequest, offering: Offering) -> ProviderResult:
    w, h = request_size(request, offering)
    seeds = [None] * request.n if request.seed is None else [request.seed + i for i in range(request.n)]
    fmt = request.output_format or "png"
    images = [RawImage(make_image(w, h, seed=s, prompt=request.prompt, fmt=fmt), s) for s in seeds]
    return ProviderResult(images=images, usage={"images": len(images), "width": w, "height": h},
                          request_id=f"mock-{next(_ids)}",
                          applied={"prompt": request.prompt, "size": f"{w}x{h}", "n": request.n})


_ids = itertools.count(1)
