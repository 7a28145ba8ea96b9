"""The Ray Serve engine's replica side: one deployment per local model, each replica holding that model's
pipeline on its own device and running requests through the same code as the in-process engine
(`pipelines.py`). Coalescing is `@serve.batch`: requests that arrive together are grouped by the same key as
in-process (model, size, steps, guidance, scheduler, adapters, input images) and counted in images.

A request is a stream of events, so progress and cancellation cross the cluster: `("started", where)`,
`("progress", step, total)` while the pipeline runs, then `("result", ProviderResult)` or `("error", fields)`.
Cancelling the stream (the caller's `DeploymentResponseGenerator.cancel()`) cancels the replica's task,
and the pipeline stops after its current step once every request in its batch is cancelled.

torch and diffusers are imported only inside a replica, so `imagebroker local deploy` runs on a machine
without the [local] extra.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from .. import errors
from ..providers.base import CallContext, ProviderResult
from ..providers.offering import Offering
from ..providers.settings import Deployment, LocalSettings
from ..types import ImageRequest

PREFIX = "model-"   # a deployment's name is the model's, prefixed: Serve's own names stay apart


def deployment_name(model: str) -> str:
    return PREFIX + "".join(c if c.isalnum() or c in "-_" else "-" for c in model)


def error_fields(exc: BaseException) -> dict[str, Any]:
    """An error as plain fields: imagebroker's errors take keyword arguments, which pickle does not keep."""
    return {"type": type(exc).__name__, "message": str(exc),
            "retry_after": getattr(exc, "retry_after", None)}


def rebuild_error(fields: dict[str, Any], offering: str) -> errors.ImageBrokerError:
    """The replica's error as the same class of the error tree on the caller's side (a class outside the
    tree: an adapter error, as it would be in-process)."""
    cls = getattr(errors, str(fields.get("type")), None)
    message = str(fields.get("message", ""))
    if isinstance(cls, type) and issubclass(cls, errors.ProviderError):
        if issubclass(cls, errors.RateLimited):
            return cls(message, retry_after=fields.get("retry_after"), provider="local", offering=offering)
        return cls(message, provider="local", offering=offering)
    if isinstance(cls, type) and issubclass(cls, errors.RequestError):
        return cls(message)
    return errors.AdapterError(f"{fields.get('type')}: {message}", provider="local", offering=offering)


def _images(jobs: list[Any]) -> int:
    return sum(j.request.n for j in jobs)


class ModelReplica:
    """One replica of one local model. Its pipeline loads when the replica starts, so a model that cannot
    load fails the deployment, and Serve's status says why."""

    def __init__(self, settings: LocalSettings, offering: Offering, deployment: Deployment) -> None:
        from .pipelines import Pipelines

        self.offering = offering
        # One thread does all of this replica's torch work, loading included, as in process: every thread
        # that enters torch's CPU kernels gets an OpenMP team of its own, and a second team makes the first
        # run 2-2.5x slower on a small machine (measured: a tiny SD call 0.49 s on one thread, 1.07-1.33 s
        # once a second thread had used torch).
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="imagebroker-replica")
        self.pipelines = Pipelines(settings, deployment.device)
        self.worker.submit(self._start, offering, deployment).result()
        co = settings.coalesce
        self.batched.set_max_batch_size(co.max_batch if co.enabled else 1)
        self.batched.set_batch_wait_timeout_s(co.window_ms / 1000)
        context = serve.get_replica_context()
        self.where = {"replica": context.replica_tag, "pid": os.getpid(), "host": socket.gethostname(),
                      "device": self.pipelines.device}
        self.counts = {"requests": 0, "images": 0, "batches": 0, "interrupted": 0}

    def _start(self, offering: Offering, deployment: Deployment) -> None:
        import torch

        if deployment.num_cpus >= 1:
            torch.set_num_threads(int(deployment.num_cpus))
        self.pipelines.load(offering)

    async def __call__(self, request: ImageRequest, offering: Offering,
                       progress: bool = False) -> AsyncIterator[tuple[Any, ...]]:
        """The request's events; `progress`: whether the caller wants each step (an event per step)."""
        from .pipelines import Job

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def step(i: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("progress", i, total))

        job = Job(request, offering, CallContext(timeout_s=0, progress=step if progress else None))
        self.counts["requests"] += 1
        yield ("started", self.where)
        task = asyncio.ensure_future(self.batched(job))
        try:
            while not task.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            outcome = task.result()
        except (asyncio.CancelledError, GeneratorExit):
            job.cancelled.set()   # the pipeline stops after this step once the whole batch is cancelled
            raise
        if isinstance(outcome, BaseException):
            yield ("error", error_fields(outcome))
        else:
            outcome.applied |= {"engine": "ray", "replica": self.where["replica"], "host": self.where["host"]}
            yield ("result", outcome)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=_images)
    async def batched(self, jobs: list[Any]) -> list[ProviderResult | BaseException]:
        from .pipelines import translate

        groups: dict[Any, list[Any]] = {}
        for job in jobs:
            groups.setdefault(job.key(), []).append(job)
        out: dict[int, ProviderResult | BaseException] = {}
        for group in groups.values():
            live = [j for j in group if not j.cancelled.is_set()]
            cancelled = errors.ProviderUnavailable("cancelled before it ran", provider="local")
            out |= {id(j): cancelled for j in group if j not in live}
            if not live:
                continue
            try:
                results = await asyncio.get_running_loop().run_in_executor(self.worker, self.pipelines.run, live)
            except BaseException as exc:
                if all(j.cancelled.is_set() for j in live):
                    self.counts["interrupted"] += 1
                out |= {id(j): translate(exc, j.offering) for j in live}
            else:
                self.counts["batches"] += 1
                self.counts["images"] += sum(len(r.images) for r in results)
                out |= {id(j): r for j, r in zip(live, results, strict=True)}
        return [out[id(j)] for j in jobs]

    def stats(self) -> dict[str, Any]:
        """Where this replica runs and what it has done (`imagebroker local status`)."""
        return self.where | self.counts | {"loaded": list(self.pipelines.cache), "weights_mib": {
            oid: round(loaded.bytes / 2**20, 3) for oid, loaded in self.pipelines.cache.items()}}


class Models:
    """The application's ingress: the model deployments by model name. Requests go to each model's own
    deployment handle; this answers which models the application serves."""

    def __init__(self, **models: Any) -> None:
        self.models = models

    def names(self) -> list[str]:
        return sorted(self.models)


def build_app(settings: LocalSettings, offerings: dict[str, Offering]) -> Any:
    """The Serve application for these local models (model name -> its offering)."""
    bound = {}
    for model, offering in sorted(offerings.items()):
        d = settings.deployment(model)
        actor: dict[str, Any] = {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus}
        if d.resources:
            actor["resources"] = dict(d.resources)
        options: dict[str, Any] = {"name": deployment_name(model), "ray_actor_options": actor,
                                   "max_ongoing_requests": d.max_ongoing_requests,
                                   "max_constructor_retry_count": d.start_retries}
        if d.autoscaling is not None:
            options["autoscaling_config"] = d.autoscaling.model_dump()
        else:
            options["num_replicas"] = d.replicas
        bound[model] = serve.deployment(ModelReplica).options(**options).bind(settings, offering, d)
    ingress = serve.deployment(Models).options(name="models", ray_actor_options={"num_cpus": 0})
    return ingress.bind(**bound)
