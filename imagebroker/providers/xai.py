"""xAI (Grok Imagine): OpenAI-shaped `POST /v1/images/generations` and a JSON-only `/v1/images/edits`
(docs.x.ai: the OpenAI SDK's multipart `images.edit()` is not accepted). No `size` field (xAI answers 400
"Argument not supported: size"): the size is asked as `aspect_ratio` and `resolution`. Every answer
reports its exact charge in `usage.cost_in_usd_ticks` (10^10 ticks = $1), even a moderation 400, and
that is what the call is settled at. A wrong key is a 400 ("Incorrect API key provided"), not a 401."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx2

from ..errors import ProviderError
from ..types import ImageRequest
from .base import RawImage, report_usage
from .http import status_error
from .images_api import ImagesApiProvider
from .offering import Offering

TICKS_PER_USD = Decimal(10) ** 10
# the catalog's sizes -> (aspect_ratio, resolution); pixel sizes from a third-party table (runware's for
# Grok Imagine), not verified against xAI's own docs
SIZES = {"1024x1024": ("1:1", "1k"), "1408x768": ("16:9", "1k"), "768x1408": ("9:16", "1k"),
         "1280x896": ("4:3", "1k"), "896x1280": ("3:4", "1k"), "2048x2048": ("1:1", "2k"),
         "2816x1536": ("16:9", "2k"), "1536x2816": ("9:16", "2k")}


def billed_usd(body: Any) -> str | None:
    """`usage.cost_in_usd_ticks` as dollars, or None when the answer does not say."""
    ticks = (body.get("usage") or {}).get("cost_in_usd_ticks") if isinstance(body, dict) else None
    if isinstance(ticks, bool) or not isinstance(ticks, int):
        return None
    return str(Decimal(ticks) / TICKS_PER_USD)


class XAIProvider(ImagesApiProvider):
    name = "xai"
    api_key_env = "XAI_API_KEY"
    default_base_url = "https://api.x.ai/v1"

    def body(self, request: ImageRequest, offering: Offering, size: tuple[int, int]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": offering.model, "prompt": request.prompt, "n": request.n,
                                "response_format": "b64_json"}
        if request.is_edit:   # the output follows the first input's aspect ratio
            refs = [{"url": img.data_url()} for img in request.images]
            return body | ({"image": refs[0]} if len(refs) == 1 else {"images": refs})
        if (asked := SIZES.get(f"{size[0]}x{size[1]}")) is None:   # grok-2-image: one size, no fields
            return body
        return body | {"aspect_ratio": asked[0], "resolution": asked[1]}

    def usage(self, data: dict[str, Any], images: list[RawImage], size: tuple[int, int]) -> dict[str, Any]:
        usage = super().usage(data, images, size)
        if (billed := billed_usd(data)) is not None:
            usage["billed_usd"] = billed
        return usage

    def error(self, resp: httpx2.Response, where: dict[str, Any]) -> ProviderError:
        try:
            billed = billed_usd(resp.json())
        except ValueError:
            billed = None
        if billed is not None:   # a refused output is still charged, and the answer says how much
            report_usage({"images": 0, "billed_usd": billed})
        return status_error(resp.status_code, resp.text, resp.headers, **where)

    def refusal(self, data: dict[str, Any]) -> str | None:
        if data.get("block_reason"):
            if (billed := billed_usd(data)) is not None:
                report_usage({"images": 0, "billed_usd": billed})
            return f"xAI blocked the request: {json.dumps(data['block_reason'])[:200]}"
        return None
