"""The gateway's ASGI app (Starlette): OpenAI's Images API (`POST /v1/images/generations`, `POST
/v1/images/edits`, `GET /v1/models`) and imagebroker's own `GET /healthz` and `GET /readyz`, over one
`AsyncBroker` per worker process: the policy routes, the ledger records, provider keys stay here.

Gateway keys: with `IMAGEBROKER_GATEWAY_KEY` set, every `/v1` request must carry it as a Bearer token
(else a 401 in OpenAI's shape); unset, the gateway is open, which is why `serve` binds to loopback by
default. Per-team keys with budgets are the next step (see docs/gateway.md)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..broker.core import AsyncBroker
from ..errors import RequestError
from .openai_shape import BadRequest, cost_headers, error_reply, images_response, request_fields

log = logging.getLogger("imagebroker.gateway")
KEY_ENV = "IMAGEBROKER_GATEWAY_KEY"
MAX_UPLOAD_BYTES = 64 << 20   # an edit's images, all of them


def create_app(policy: Any = None, ledger: Any = None, *, store: Any = False) -> Starlette:
    """The app; its broker is made when it starts (in the worker process) and closed when it stops."""
    state: dict[str, AsyncBroker] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["broker"] = AsyncBroker(policy, ledger, store=store)
        try:
            yield
        finally:
            await state.pop("broker").aclose()

    def broker() -> AsyncBroker:
        return state["broker"]

    async def generations(request: Request) -> JSONResponse:
        if (denied := _authorise(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return _reply(BadRequest("the body is not JSON"))
        if not isinstance(body, dict):
            return _reply(BadRequest("the body must be a JSON object"))
        return await _generate(broker(), body)

    async def edits(request: Request) -> JSONResponse:
        if (denied := _authorise(request)) is not None:
            return denied
        if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES:
            return _reply(BadRequest(f"the upload is larger than {MAX_UPLOAD_BYTES >> 20} MiB"))
        try:
            form = await request.form(max_files=17, max_fields=64)
        except Exception as exc:   # starlette's MultiPartException and the parser's own errors
            return _reply(BadRequest(f"the body is not a multipart form: {exc}"))
        body: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        images = [await f.read() for k, f in form.multi_items() if k in ("image", "image[]") and not isinstance(f, str)]
        mask = form.get("mask")
        if not images:
            return _reply(BadRequest("image: at least one image file is required"))
        body["images"] = images
        if mask is not None and not isinstance(mask, str):
            body["mask"] = await mask.read()
        return await _generate(broker(), body)

    async def models(request: Request) -> JSONResponse:
        if (denied := _authorise(request)) is not None:
            return denied
        b = broker()
        data = [{"id": o.id, "object": "model", "created": 0, "owned_by": o.provider}
                for o in b.catalog if not o.retired(_today()) and b.provider(o.provider).availability(o) is None]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        try:
            await asyncio.to_thread(broker().ledger.served, "readyz-probe", 0.0)
        except Exception as exc:
            return JSONResponse({"status": "not ready", "ledger": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready"})

    return Starlette(routes=[
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ], lifespan=lifespan)


async def _generate(broker: AsyncBroker, body: dict[str, Any]) -> JSONResponse:
    try:
        fields = request_fields(body)
        for name in ("images", "mask"):
            if name in body:
                fields[name] = body[name]
        result = await broker.generate(**fields)
    except Exception as exc:   # every failure answers in OpenAI's shape; a bug is logged with its traceback
        if not isinstance(exc, (RequestError,)) and type(exc).__module__.split(".")[0] != "imagebroker" \
                and type(exc).__name__ != "ValidationError":
            log.exception("gateway bug answering a request")
        return _reply(exc)
    return JSONResponse(images_response(result), headers=cost_headers(result))


def _reply(exc: Exception) -> JSONResponse:
    status, body, headers = error_reply(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _authorise(request: Request) -> JSONResponse | None:
    key = os.environ.get(KEY_ENV)
    if not key:
        return None
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if hmac.compare_digest(given.encode(), key.encode()):
        return None
    return JSONResponse({"error": {"message": "Incorrect gateway key provided.", "type": "invalid_request_error",
                                   "param": None, "code": "invalid_api_key"}}, status_code=401)


def _today() -> Any:
    from datetime import date

    return date.today()
