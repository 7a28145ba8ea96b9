"""The gateway's ASGI app (Starlette): OpenAI's Images API (`POST /v1/images/generations`, `POST
/v1/images/edits`, `GET /v1/models`) and imagebroker's own `GET /healthz` and `GET /readyz`, over one
`AsyncBroker` per worker process: the policy routes, the ledger records, provider keys stay here.

Gateway keys (`imagebroker keys create`, kept in the ledger, `keys.py`): once one exists, every `/v1` request
must carry an active one as its Bearer token (else a 401 in OpenAI's shape); its tags go on the call, its
budget is reserved like a policy budget, its allow-list limits the offerings it may use (403 otherwise).
`IMAGEBROKER_GATEWAY_KEY`, when set, is one more key, an admin one. With neither (no key ever made;
revoking them all does not reopen it), the gateway is open, which is why `serve` binds to loopback by
default (`keys.Callers`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..broker.core import AsyncBroker
from ..errors import NoRouteError, RequestError
from ..logs import GATEWAY_LOG_ENV as LOG_ENV
from ..logs import enable_gateway_logging
from ..policies.loader import load_policy
from . import links, webhooks
from .dashboard import Dashboard
from .drain import DEFAULT_DRAIN_S, DRAIN_ENV, Drain, DrainMiddleware
from .jobs import JobQueue, new_id, stash_inputs, unstash_inputs
from .keys import KEY_TAG, Callers, GatewayKey, KeyStore, for_key
from .metrics import Metrics
from .openai_shape import BadRequest, cost_headers, error_reply, images_response, plain, request_fields, streams
from .streaming import stream_answer

log = logging.getLogger("imagebroker.gateway")
access = logging.getLogger("imagebroker.gateway.access")
MAX_UPLOAD_BYTES = 64 << 20   # an edit's images, all of them
JOB_POLL_S = 0.2             # how soon a worker looks again for queued jobs after finding some
JOB_IDLE_S = 2.0             # ... and at most how long it waits when it finds none (a job it queues wakes it)


def create_app(policy: Any = None, ledger: Any = None, *, store: Any = None) -> Starlette:
    """The app; its broker is made when it starts (in the worker process) and closed when it stops. `store`:
    the broker's image store (None: on, as for the command line, unless the policy says `store.enabled: false`),
    which `response_format=url` and idempotent replays read."""
    state: dict[str, AsyncBroker] = {}
    metrics = Metrics()
    drain = Drain(float(os.environ.get(DRAIN_ENV) or DEFAULT_DRAIN_S))
    pages = Dashboard()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if os.environ.get(LOG_ENV):   # a worker of `imagebroker serve` (a process of its own with --workers N)
            enable_gateway_logging(access=os.environ[LOG_ENV] == "access")
        chosen = load_policy(policy)
        kept = store if store is not None else (False if chosen.store.enabled is False else chosen.store.url or True)
        state["broker"] = AsyncBroker(chosen, ledger, store=kept)   # images kept, as the command line keeps them
        runner = asyncio.create_task(run_jobs())
        drain.install()
        try:
            yield
        finally:
            drain.uninstall()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            await state.pop("broker").aclose()

    async def run_jobs() -> None:
        """Take queued jobs (this worker's share: whoever claims first runs it) and run them one at a time.
        An idle worker looks less and less often, up to every JOB_IDLE_S (each look is a ledger transaction),
        and at once when it queues a job itself; another worker's job waits at most JOB_IDLE_S for it."""
        queue = JobQueue(broker().ledger)
        await asyncio.to_thread(queue.requeue_orphans)
        idle = JOB_POLL_S
        while True:
            if drain.draining:   # another worker takes what is queued
                await asyncio.sleep(JOB_POLL_S)
                continue
            try:
                claimed = await asyncio.to_thread(queue.claim)
            except Exception:   # the ledger away for a moment: try again shortly
                log.warning("could not read the job queue", exc_info=True)
                claimed = None
            if claimed is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle):
                        await queued.wait()
                queued.clear()
                idle = min(idle * 2, JOB_IDLE_S)
                continue
            idle = JOB_POLL_S
            drain.in_flight += 1   # a drain waits for it
            try:
                await run_job(queue, *claimed)
            except Exception:   # the job stays `running`; a restart of this worker queues it again
                log.exception("job %s could not be finished", claimed[0])
                await asyncio.sleep(JOB_POLL_S)
            finally:
                drain.in_flight -= 1

    async def run_job(queue: JobQueue, job: str, fields: dict[str, Any], key_name: str | None) -> None:
        key = await asyncio.to_thread(KeyStore(broker().ledger).named, key_name) if key_name else None
        if key is not None and (budget := key.budget()) is not None:
            broker().add_budgets([budget])
        try:
            fields = await asyncio.to_thread(unstash_inputs, broker().store, fields)
            result = await broker().generate(**fields)
        except Exception as exc:
            status, body, _ = error_reply(exc)
        else:
            metrics.served(result)
            status, body = 200, images_response(result)
            body["data"] = [{"sha256": img.sha256, "format": img.format} for img in result.images]
        await asyncio.to_thread(queue.finish, job, status, plain(body))
        if key is not None and key.webhook_url and key.webhook_secret:
            done = {"id": job, "object": "image.job", "status": "done" if status == 200 else "failed",
                    "http_status": status}
            await webhooks.announce(key.webhook_url, key.webhook_secret, done)

    def broker() -> AsyncBroker:
        return state["broker"]

    keys = Callers(broker)
    queued = asyncio.Event()   # set when this worker queues a job, so that its job runner looks now

    async def caller(request: Request) -> GatewayKey | JSONResponse | None:
        """The key this request carries (None: the gateway is open), or the 401 to answer."""
        key = await keys.of(request.headers.get("authorization", ""))
        if key is not False:
            return key
        return JSONResponse({"error": {"message": "Incorrect gateway key provided.", "type": "invalid_request_error",
                                       "param": None, "code": "invalid_api_key"}}, status_code=401)

    async def generations(request: Request) -> Response:
        key = await caller(request)
        if isinstance(key, JSONResponse):
            return key
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        if _wants_job(request):
            return await submit(body, key)
        return await _generate(broker(), body, key, metrics, request)

    async def submit(body: dict[str, Any], key: GatewayKey | None) -> JSONResponse:
        """202 and a job id at once; the call runs on whichever worker claims it. Bad requests are found now."""
        b = broker()
        if b.store is None:
            return _reply(BadRequest("async jobs keep their images in the image store: enable store in the policy"))
        job = new_id()
        try:
            fields = request_fields(body)
            if (denied := for_key(b, key, fields)) is not None:
                return denied
            fields["idempotency_key"] = job   # a job run again after a crash is not paid for twice
            inputs = {k: body[k] for k in ("images", "mask") if k in body}   # an edit: planned on its inputs
            plan = b.plan(**fields, **inputs)
            if not plan.candidates:
                raise NoRouteError(f"no offering can serve this request under policy {b.policy.name!r}",
                                   plan.rejected)
        except Exception as exc:
            return _reply(exc)
        if inputs:
            fields |= await asyncio.to_thread(stash_inputs, b.store, inputs)
        await asyncio.to_thread(JobQueue(b.ledger).submit, job, fields, key.name if key else None)
        queued.set()
        return JSONResponse({"id": job, "object": "image.job", "status": "queued"}, status_code=202,
                            headers={"location": f"/v1/images/jobs/{job}"})

    async def job_status(request: Request) -> JSONResponse:
        key = await caller(request)
        if isinstance(key, JSONResponse):
            return key
        row = await asyncio.to_thread(JobQueue(broker().ledger).get, request.path_params["job"])
        if row is None or (key is not None and not key.admin and row["key_name"] != key.name):
            return JSONResponse({"error": {"message": "no such job", "type": "invalid_request_error", "param": None,
                                           "code": "job_not_found"}}, status_code=404)
        head = {"id": row["id"], "object": "image.job", "status": row["status"]}
        if row["status"] in ("queued", "running"):
            return JSONResponse(head)
        body = json.loads(row["response_json"])
        if row["status"] == "failed":
            return JSONResponse({**head, "http_status": row["http_status"], **body})
        store = broker().store
        data = []
        for item in body["data"]:
            image = await asyncio.to_thread(store.get, item["sha256"]) if store is not None else None
            if image is None:
                return _reply(BadRequest(f"job {row['id']}: its image {item['sha256'][:12]} is no longer stored"))
            data.append({"b64_json": base64.b64encode(image).decode()})
        return JSONResponse({**head, **body, "data": data})

    async def edits(request: Request) -> Response:
        key = await caller(request)
        if isinstance(key, JSONResponse):
            return key
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
        if _wants_job(request):
            return await submit(body, key)
        return await _generate(broker(), body, key, metrics, request)

    async def models(request: Request) -> JSONResponse:
        key = await caller(request)
        if isinstance(key, JSONResponse):
            return key
        b = broker()
        data = [{"id": o.id, "object": "model", "created": 0, "owned_by": o.provider}
                for o in b.catalog if not o.retired(_today()) and b.provider(o.provider).availability(o) is None
                and (key is None or key.allows(o.id))]
        return JSONResponse({"object": "list", "data": data})

    async def route(request: Request) -> JSONResponse:
        key = await caller(request)
        if isinstance(key, JSONResponse):
            return key
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        try:
            plan = broker().plan(**request_fields(body))
        except Exception as exc:   # a bad field, an unknown model: OpenAI's 400
            return _reply(exc)
        return JSONResponse(plain(plan.as_json()))

    async def costs(request: Request) -> JSONResponse:
        """`costs --format json`: an admin key (or an open gateway) may group by anything; another key sees
        only its own calls' totals."""
        key = await caller(request)
        if isinstance(key, JSONResponse):
            return key
        from ..broker.report import cost_report, parse_when

        q = request.query_params
        mine = key is not None and not key.admin
        try:
            groups, total = await asyncio.to_thread(
                cost_report, broker().ledger, since=parse_when(q.get("since")), until=parse_when(q.get("until")),
                by=f"tag:{KEY_TAG}" if mine else q.get("by", "provider"))
        except Exception as exc:
            return _reply(exc)
        if mine:
            groups = [g for g in groups if g.key == key.name]
            total = groups[0] if groups else None
        return JSONResponse(plain({"groups": [g.as_dict() for g in groups],
                                    "total": total.as_dict() if total else None}))

    async def dashboard_page(request: Request) -> Response:
        key = await caller(request)
        if isinstance(key, JSONResponse):
            return key
        return await pages.answer(broker(), key, request.query_params.get("since"))

    async def image_file(request: Request) -> Response:
        """A stored image behind a signed, expiring link (`links.py`): no key needed, the signature is one."""
        name = request.path_params["name"]
        why = links.check(name, request.query_params.get("expires"), request.query_params.get("sig"))
        store = broker().store
        if why is None and store is not None:
            data = await asyncio.to_thread(store.get, name.split(".")[0])
            if data is not None:
                return Response(data, media_type=links.MEDIA[name.rsplit(".", 1)[1]],
                                headers={"cache-control": "private, max-age=3600"})
            why = "the image is no longer in the store"
        return JSONResponse({"error": {"message": why or "no image store", "type": "invalid_request_error",
                                       "param": None, "code": "invalid_link"}}, status_code=403)

    async def prometheus(request: Request) -> Response:
        return Response(await metrics.render(broker()), media_type="text/plain; version=0.0.4")

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        """200 while the ledger and the shared state answer; 503 while draining, so a load balancer looks away."""
        if drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            await asyncio.to_thread(broker().ledger.served, "readyz-probe", 0.0)
        except Exception as exc:
            return JSONResponse({"status": "not ready", "ledger": type(exc).__name__}, status_code=503)
        try:
            await broker().shared_state.ping()
        except Exception as exc:
            return JSONResponse({"status": "not ready", "state": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready", "state": broker().shared_state.where})

    return Starlette(routes=[
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/route", route, methods=["POST"]),
        Route("/v1/costs", costs, methods=["GET"]),
        Route("/v1/images/files/{name}", image_file, methods=["GET"]),
        Route("/v1/images/jobs/{job}", job_status, methods=["GET"]),
        Route("/dashboard", dashboard_page, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ], middleware=[Middleware(DrainMiddleware, drain=drain)], lifespan=lifespan)


async def _generate(broker: AsyncBroker, body: dict[str, Any], key: GatewayKey | None, metrics: Metrics,
                    request: Request) -> Response:
    started = time.perf_counter()
    reply = await _answer(broker, body, key, metrics, request, started)
    access.info("%s %s key=%s offering=%s status=%s cost=%s %s latency_ms=%.1f", request.method, request.url.path,
                key.name if key else "-", reply.headers.get("x-imagebroker-offering", "-"), reply.status_code,
                reply.headers.get("x-imagebroker-cost-usd", "-"), reply.headers.get("x-imagebroker-cost-status", "-"),
                (time.perf_counter() - started) * 1000, extra={"request_id": reply.headers.get("x-request-id")})
    return reply


async def _answer(broker: AsyncBroker, body: dict[str, Any], key: GatewayKey | None, metrics: Metrics,
                  request: Request, started: float) -> Response:
    as_url = body.get("response_format") == "url"
    if as_url and broker.store is None:
        return _reply(BadRequest("response_format=url needs the image store: set store.enabled in the policy "
                                 "(or IMAGEBROKER_STORE_URL)"))
    try:
        fields = request_fields(body)
        for name in ("images", "mask"):
            if name in body:
                fields[name] = body[name]
        if request.headers.get("idempotency-key"):   # the same call on any worker: the ledger knows it
            fields["idempotency_key"] = request.headers["idempotency-key"]
        if (denied := for_key(broker, key, fields)) is not None:
            return denied
        if streams(body):
            return await stream_answer(broker, fields, body, metrics.served, lambda exc: _failed(
                exc, body, metrics, started))
        result = await broker.generate(**fields)
    except Exception as exc:   # every failure answers in OpenAI's shape; a bug is logged with its traceback
        return _failed(exc, body, metrics, started)
    metrics.served(result)
    urls = None
    if as_url:
        root = str(request.base_url).rstrip("/")
        urls = [root + links.signed_path(img.sha256, img.format) for img in result.images]
    return JSONResponse(images_response(result, urls), headers=cost_headers(result))


def _failed(exc: Exception, body: dict[str, Any], metrics: Metrics, started: float) -> Response:
    if not isinstance(exc, (RequestError,)) and type(exc).__module__.split(".")[0] != "imagebroker" \
            and type(exc).__name__ != "ValidationError":
        log.exception("gateway bug answering a request")
    reply = _reply(exc)
    metrics.failed(body.get("model") if isinstance(body.get("model"), str) else None, reply.status_code,
                   time.perf_counter() - started)
    return reply


def _wants_job(request: Request) -> bool:
    """`Prefer: respond-async`: answer 202 and a job id now, the images later."""
    return "respond-async" in request.headers.get("prefer", "").lower()


def _reply(exc: Exception) -> JSONResponse:
    status, body, headers = error_reply(exc)
    return JSONResponse(body, status_code=status, headers=headers)


async def _json_object(request: Request) -> dict[str, Any] | Response:
    """The request's JSON object body, or the 400 to answer."""
    try:
        body = await request.json()
    except ValueError:
        return _reply(BadRequest("the body is not JSON"))
    return body if isinstance(body, dict) else _reply(BadRequest("the body must be a JSON object"))


def _today() -> Any:
    from datetime import date

    return date.today()
