"""The OpenAI Images API's shapes, in and out: a request body (JSON for generations, multipart for edits) as
`ImageRequest` fields, an `ImageResult` as OpenAI's `ImagesResponse`, and imagebroker's errors as OpenAI's
error JSON with the status codes its SDK maps onto its exception classes."""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from ..errors import (
    AllAttemptsFailed,
    BudgetExceeded,
    CallTimedOut,
    ConfigError,
    ContentRejected,
    DuplicateRequest,
    ImageBrokerError,
    NoRouteError,
    RequestError,
)
from ..types import ImageResult, PartialImage, SkipReason

# OpenAI's fields, and what each becomes; `model: auto` (or none) leaves the choice to the policy
PASSED = ("n", "quality", "background", "output_format", "seed", "negative_prompt", "aspect_ratio",
          "resolution", "strength", "idempotency_key")
IGNORED = ("moderation", "output_compression", "input_fidelity", "style")   # passed to OpenAI offerings only


class BadRequest(RequestError):
    """A request the gateway cannot read (a field of the wrong type, a missing prompt)."""


def request_fields(body: dict[str, Any]) -> dict[str, Any]:
    """`generate()`'s keyword arguments for an OpenAI-shaped body (generations or edits)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt: a non-empty string is required")
    if body.get("response_format") not in (None, "b64_json", "url"):
        raise BadRequest("response_format: b64_json or url")
    fields: dict[str, Any] = {"prompt": prompt}
    model = body.get("model")
    if model not in (None, "", "auto"):
        fields["model"] = str(model)
    size = body.get("size")
    if size not in (None, "", "auto"):
        fields["size"] = str(size)
    for name in PASSED:
        if body.get(name) is not None:
            fields[name] = _number(name, body[name]) if name in ("n", "seed", "strength") else body[name]
    if streams(body) and body.get("partial_images") not in (None, "", 0, "0"):
        fields["partial_images"] = _number("partial_images", body["partial_images"])
    extra = {k: body[k] for k in IGNORED if body.get(k) is not None}
    if extra:
        fields["extra"] = {"openai": extra}
    if body.get("user"):
        fields["tags"] = {"user": str(body["user"])[:200]}
    fields |= _controls(body)
    return fields


def _controls(body: dict[str, Any]) -> dict[str, Any]:
    """imagebroker's own JSON fields (the SDK's `extra_body`): `control` (a list of {kind, image, scale, start,
    end, preprocess}) and `image_prompts` (a list of {image, scale}, or images), every image as base64 or a
    data: URI. Decoded here, so that a string never reaches a reader that would open it as a file."""
    out: dict[str, Any] = {}
    for name, image_keys in (("control", ("image", "source")), ("image_prompts", ("image",))):
        items = body.get(name)
        if items in (None, "", []):
            continue
        if not isinstance(items, list):
            raise BadRequest(f"{name}: a list")
        parsed = []
        for i, item in enumerate(items):
            entry = dict(item) if isinstance(item, dict) else {"image": item}
            for key in image_keys:
                if key in entry:
                    entry[key] = _decoded(entry[key], f"{name}[{i}].{key}")
            parsed.append(entry)
        out[name] = parsed
    return out


def _decoded(value: Any, what: str) -> bytes:
    text = value.split(",", 1)[1] if isinstance(value, str) and value.startswith("data:") else value
    if not isinstance(text, str):
        raise BadRequest(f"{what}: an image as base64 or a data: URI")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what}: not base64 (give the image as base64 or a data: URI)") from None


def streams(body: dict[str, Any]) -> bool:
    """`stream: true` (JSON true, or the text a multipart form sends)."""
    return body.get("stream") in (True, "true", "True")


def _number(name: str, value: Any) -> int | float:
    """A multipart form sends numbers as text; JSON as numbers. Either is read; anything else is a 400."""
    try:
        number = float(value) if name == "strength" else int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name}: a number is required, not {str(value)[:40]!r}") from None
    return number


def images_response(result: ImageResult, urls: list[str] | None = None) -> dict[str, Any]:
    """OpenAI's `ImagesResponse`: `created`, `data[].b64_json` (or `data[].url`, given `urls`), and `usage` where
    the call was token-billed; imagebroker's own account of the call under `imagebroker` (the SDK ignores
    fields it does not know)."""
    first = result.images[0] if result.images else None
    data = ([{"url": u} for u in urls] if urls is not None else
            [{"b64_json": base64.b64encode(img.data).decode()} for img in result.images])
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": data,
        "output_format": first.format if first else None,
        "size": f"{first.width}x{first.height}" if first else None,
        "imagebroker": {"request_id": result.request_id, "offering": result.offering,
                        "cost": {"usd": _usd(result.cost.usd), "status": result.cost.status,
                                 "detail": result.cost.detail},
                        "dropped": list(result.dropped), "warnings": list(result.warnings)},
    }
    units = result.cost.units
    if any(k.endswith("_tokens") for k in units):
        text_in, image_in = int(units.get("input_text_tokens", 0)), int(units.get("input_image_tokens", 0))
        out = int(units.get("output_image_tokens", 0)) + int(units.get("output_text_tokens", 0))
        body["usage"] = {"input_tokens": text_in + image_in, "output_tokens": out,
                         "total_tokens": text_in + image_in + out,
                         "input_tokens_details": {"text_tokens": text_in, "image_tokens": image_in}}
    if units.get("quality"):
        body["quality"] = units["quality"]
    return body


def cost_headers(result: ImageResult) -> dict[str, str]:
    return {"x-request-id": result.request_id, "x-imagebroker-offering": result.offering,
            "x-imagebroker-cost-usd": _usd(result.cost.usd) or "unknown",
            "x-imagebroker-cost-status": result.cost.status}


def _usd(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def error_reply(exc: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, OpenAI error JSON, headers) for an exception out of `generate()`. Statuses are the ones the
    openai SDK maps: 400 BadRequestError (content_policy_violation for refusals), 429 RateLimitError (a budget,
    with Retry-After), 502 and 503 InternalServerError (upstream failures), 504 (the call's timeout)."""
    message = str(exc)
    if isinstance(exc, ValidationError):   # a field ImageRequest refuses: its own words, no traceback
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        return 400, _error(f"{where or 'request'}: {first.get('msg')}", "invalid_request_error", None, param=where), {}
    if isinstance(exc, ContentRejected):
        return 400, _error(message, "invalid_request_error", "content_policy_violation"), {}
    if isinstance(exc, DuplicateRequest):   # an Idempotency-Key already served, its images not kept: 409
        return 409, _error(message, "invalid_request_error", "idempotency_key_reused"), {}
    if isinstance(exc, (BadRequest, RequestError, ConfigError)):
        return 400, _error(message, "invalid_request_error", None, param=getattr(exc, "field", None)), {}
    if isinstance(exc, NoRouteError):
        return 400, _error(message, "invalid_request_error", "no_route"), {}
    if isinstance(exc, BudgetExceeded):
        return 429, _error(message, "budget_exceeded", "budget_exceeded"), {"Retry-After": "60"}
    if isinstance(exc, CallTimedOut):
        return 504, _error(message, "timeout", "timeout"), {}
    if isinstance(exc, AllAttemptsFailed):
        if exc.retry_after is not None:   # nothing sent: every provider's rate limit was full for the call's timeout
            return 429, _error(message, "rate_limit_exceeded", "rate_limit_exceeded"), {
                "Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        if not exc.attempts and exc.skipped and all(s.reason == SkipReason.OVER_BUDGET for s in exc.skipped):
            return 429, _error(message, "budget_exceeded", "budget_exceeded"), {"Retry-After": "60"}
        unavailable = all(a.error_type in ("ProviderUnavailable", "RateLimited", "OutcomeUnknown")
                          for a in exc.attempts) and exc.attempts
        return (503 if unavailable else 502), _error(message, "upstream_error", "upstream_failed"), {}
    if isinstance(exc, ImageBrokerError):
        return 502, _error(message, "upstream_error", None), {}
    return 500, _error("internal error in the gateway (logged)", "server_error", None), {}


def _error(message: str, kind: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def preview_event(partial: PartialImage, body: dict[str, Any], edit: bool) -> str:
    """One streamed preview as OpenAI sends it: `image_generation.partial_image` (or `image_edit.`), index from 0."""
    kind = "image_edit.partial_image" if edit else "image_generation.partial_image"
    event = {"type": kind, "b64_json": base64.b64encode(partial.data).decode(), "created_at": int(time.time()),
             "size": str(body.get("size") or "auto"), "quality": str(body.get("quality") or "auto"),
             "background": str(body.get("background") or "auto"), "output_format": partial.format,
             "partial_image_index": partial.index - 1}
    return f"event: {kind}\ndata: {json.dumps(event)}\n\n"


def error_event(exc: Exception) -> str:
    """A failure after the stream began (its 200 already sent): OpenAI's `error` event, with the error JSON."""
    status, body, _ = error_reply(exc)
    return f"event: error\ndata: {json.dumps({**body, 'status': status})}\n\n"


def stream_events(result: ImageResult, edit: bool) -> list[str]:
    """`stream: true`: one `...completed` event per image, OpenAI's streaming shape, whatever offering served it
    (previews, where the offering streams them, come before: `preview_event`). `usage` is the call's tokens
    where it was token-billed, else zeros."""
    body = images_response(result)
    usage = body.get("usage") or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                  "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}
    kind = "image_edit.completed" if edit else "image_generation.completed"
    events = []
    for item, image in zip(body["data"], result.images, strict=True):
        event = {"type": kind, "b64_json": item["b64_json"], "created_at": body["created"],
                 "size": f"{image.width}x{image.height}", "quality": body.get("quality") or "auto",
                 "background": "auto", "output_format": image.format, "usage": usage,
                 "imagebroker": body["imagebroker"]}
        events.append(f"event: {kind}\ndata: {json.dumps(event)}\n\n")
    return events


def plain(data: Any) -> Any:
    """Decimals as strings (exact), for JSON."""
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [plain(v) for v in data]
    return format(data, "f") if isinstance(data, Decimal) else data
