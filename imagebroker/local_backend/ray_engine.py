"""The Ray Serve engine's caller side: the local provider's requests go to each model's deployment through a
`DeploymentHandle`, as a stream (progress, then the result), and what Serve says of each deployment is what
the planner sees (unavailable with Serve's reason, warm when healthy, the replicas' device).

`local.ray.address` unset: the first call starts a Ray instance on this machine and deploys the models
itself (and `close` stops it). Set (`auto`, `ray://HOST:10001`): it joins that cluster, where
`imagebroker local deploy` put the application.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayError

from ..errors import BadProviderResponse, ProviderUnavailable
from ..providers.base import CallContext, ProviderResult
from ..providers.offering import Offering
from ..providers.settings import LocalSettings
from ..types import ImageRequest
from .ray_serve import build_app, deployment_name, rebuild_error

log = logging.getLogger("imagebroker.local.ray")
STATUS_TTL_S = 2.0      # how long Serve's word on the deployments is trusted before asking again
RETRY_CONNECT_S = 10.0  # after a failed start or connection, how long before trying again
HEALTHY = "HEALTHY"


def reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast where nothing listens (Ray itself waits minutes for a cluster that is not there)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {address}: {exc}") from None


def join(settings: LocalSettings, address: str | None = None) -> None:
    """Connect this process to the cluster (or start one here when there is no address)."""
    if ray.is_initialized():
        return
    logging.getLogger("ray.serve").setLevel(logging.WARNING)   # Serve's notes, not the caller's output
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False,
                               "configure_logging": False}
    address = address or settings.ray.address
    if address:
        reachable(address)
        ray.init(address=address, **options)
    else:   # a Ray instance of our own: no usage report to Anyscale unless the user asks for it
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=settings.ray.num_cpus, num_gpus=settings.ray.num_gpus, include_dashboard=False,
                 **options)


def deploy(settings: LocalSettings, offerings: dict[str, Offering]) -> None:
    """Start or update the application (blocks until every deployment runs or one fails)."""
    serve.start(proxy_location="Disabled")   # handles only: no HTTP proxy
    serve.run(build_app(settings, offerings), name=settings.ray.app, route_prefix=None)


def _short(message: str) -> str:
    """Serve's message without its traceback: its first line and the exception that ended it."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", message or "").splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0].split(' Error:')[0]} ... {lines[-1]}"


def deployments(app: str) -> dict[str, tuple[str, str]] | None:
    """Serve's status of each deployment of the application: name -> (status, message); None: not there."""
    found = serve.status().applications.get(app)
    if found is None:
        return None
    return {name: (str(getattr(d.status, "value", d.status)), _short(d.message))
            for name, d in found.deployments.items()}


class RayEngine:
    def __init__(self, settings: LocalSettings, offerings: dict[str, Offering]) -> None:
        self.settings = settings
        self.offerings = offerings          # model -> offering: what a local instance deploys
        self.started_here = False
        self._lock = threading.Lock()
        self._ready = False
        self._problem: tuple[float, str] | None = None
        self._status: dict[str, tuple[str, str]] = {}
        self._status_at = 0.0
        self._refreshing = False
        self._handles: dict[str, Any] = {}

    @property
    def where(self) -> str:
        return self.settings.ray.address or "a Ray instance on this machine"

    # -- what the planner sees ----------------------------------------------------------------
    def _recent_problem(self) -> str | None:
        """Why the cluster could not be started or joined, while that is recent enough to trust."""
        if self._problem is not None and time.monotonic() - self._problem[0] < RETRY_CONNECT_S:
            return self._problem[1]
        return None

    def unavailable(self, model: str) -> str | None:
        if problem := self._recent_problem():
            return problem
        if not self._ready:
            return None   # not asked yet: the first call starts or joins the cluster
        self._refresh_soon()
        status = self._status.get(deployment_name(model))
        if status is None:
            return (f"model {model} is not deployed in Serve application {self.settings.ray.app!r} at "
                    f"{self.where}: run imagebroker local deploy --policy P")
        if status[0] not in (HEALTHY, "UPDATING", "UPSCALING", "DOWNSCALING"):
            return f"Ray Serve deployment {deployment_name(model)} is {status[0]}: {status[1]}".strip(": ")
        return None

    def warm(self, model: str) -> bool:
        return self._status.get(deployment_name(model), ("",))[0] == HEALTHY

    def _refresh_soon(self) -> None:
        if self._refreshing or time.monotonic() - self._status_at < STATUS_TTL_S:
            return
        self._refreshing = True
        threading.Thread(target=self._refresh, name="imagebroker-ray-status", daemon=True).start()

    def _refresh(self) -> None:
        try:
            self._status = deployments(self.settings.ray.app) or {}
        except Exception as exc:   # the cluster went away: say so in the plan
            self._problem = (time.monotonic(), f"Ray cluster at {self.where} unreachable: {exc}")
        finally:
            self._status_at, self._refreshing = time.monotonic(), False

    # -- starting or joining ------------------------------------------------------------------
    def start(self) -> None:
        """Blocking: join (or start) the cluster; a local instance deploys the models itself."""
        with self._lock:
            if self._ready:
                return
            try:
                here = not self.settings.ray.address and not ray.is_initialized()
                join(self.settings)
                self.started_here = here
                if not self.settings.ray.address:
                    try:
                        deploy(self.settings, self.offerings)
                    except RuntimeError as exc:   # one model failed: the others still serve
                        log.warning("Ray Serve application %s did not fully start: %s", self.settings.ray.app,
                                    str(exc).splitlines()[0] if str(exc) else exc)
                status = deployments(self.settings.ray.app)
            except Exception as exc:
                why = f"Ray cluster at {self.where} could not be used: {type(exc).__name__}: {exc}"
                self._problem = (time.monotonic(), why.splitlines()[0])
                raise ProviderUnavailable(self._problem[1], provider="local") from None
            if status is None:
                why = (f"Serve application {self.settings.ray.app!r} is not deployed at {self.where}: "
                       "run imagebroker local deploy --policy P")
                self._problem = (time.monotonic(), why)
                raise ProviderUnavailable(why, provider="local")
            self._status, self._status_at, self._problem, self._ready = status, time.monotonic(), None, True

    # -- one request --------------------------------------------------------------------------
    async def generate(self, request: ImageRequest, offering: Offering, ctx: CallContext) -> ProviderResult:
        if not self._ready:
            if problem := self._recent_problem():
                raise ProviderUnavailable(problem, provider="local", offering=offering.id)
            await asyncio.to_thread(self.start)
        model = offering.model
        if why := self.unavailable(model):
            raise ProviderUnavailable(why, provider="local", offering=offering.id)
        name = deployment_name(model)
        if name not in self._handles:
            self._handles[name] = serve.get_deployment_handle(name, self.settings.ray.app, _check_exists=False)
        stream = self._handles[name].options(stream=True).remote(request, offering, ctx.progress is not None)
        where: dict[str, Any] = {}
        try:
            async for event in stream:
                if event[0] == "progress" and ctx.progress is not None:
                    ctx.progress(event[1], event[2])
                elif event[0] == "started":
                    where = event[1]
                    log.info("%s: on Ray Serve replica %s (pid %s on %s, %s)", offering.id, where["replica"],
                             where["pid"], where["host"], where["device"])
                elif event[0] == "result":
                    result: ProviderResult = event[1]
                    result.request_id = f"{where.get('replica', '?')}:{stream.request_id}"
                    return result
                elif event[0] == "error":
                    raise rebuild_error(event[1], offering.id)
        except asyncio.CancelledError:
            stream.cancel()   # the replica's task is cancelled: its pipeline stops after this step
            raise
        except RayError as exc:
            self._status_at = 0.0   # ask Serve again before the next plan
            on = f"replica {where['replica']} (pid {where['pid']} on {where['host']})" if where else "a replica"
            raise ProviderUnavailable(f"Ray Serve {on} failed mid-request: {type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else ''}",
                                      provider="local", offering=offering.id) from None
        raise BadProviderResponse("the replica's stream ended without a result", provider="local",
                                  offering=offering.id)

    def close(self) -> None:
        self._handles.clear()
        if self.started_here and ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        self._ready = self.started_here = False
