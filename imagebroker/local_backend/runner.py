"""The in-process engine: Diffusers pipelines in this process, one worker thread per device running one
pipeline call at a time. Requests waiting for the same model with the same size, steps, guidance,
scheduler and adapters are coalesced into one batch; every image keeps its own `torch.Generator`, so a
batched image is identical to the same seed made alone (`pipelines.py` runs the batch).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

from ..providers.base import CallContext, ProviderResult
from ..providers.offering import Offering
from ..providers.settings import LocalSettings
from ..types import ImageRequest
from .pipelines import Job, Pipelines, translate


class LocalRunner:
    def __init__(self, settings: LocalSettings, device_kind: str) -> None:
        self.settings = settings
        self.pipelines = Pipelines(settings, device_kind)
        self.device = self.pipelines.device
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._deferred: list[Job] = []
        self._thread = threading.Thread(target=self._work, name=f"imagebroker-{self.device}",
                                        daemon=True)
        self._thread.start()

    @property
    def generation(self) -> int:
        return self.pipelines.generation

    def is_loaded(self, offering: Offering) -> bool:
        return self.pipelines.is_loaded(offering)

    async def generate(self, request: ImageRequest, offering: Offering,
                       ctx: CallContext) -> ProviderResult:
        loop = asyncio.get_running_loop()
        job = Job(request, offering, ctx, loop, loop.create_future())
        self._queue.put(job)
        try:
            return await asyncio.shield(job.future)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            job.cancelled.set()  # the pipeline stops after the current step
            raise

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self.pipelines.clear()

    # -- the worker thread ------------------------------------------------------------------
    def _next(self) -> Job | None:
        return self._deferred.pop(0) if self._deferred else self._queue.get()

    def _gather(self, first: Job) -> list[Job]:
        co = self.settings.coalesce
        batch, images = [first], first.request.n
        if not co.enabled or co.max_batch <= 1:
            return batch
        key, deadline = first.key(), time.monotonic() + co.window_ms / 1000
        candidates, self._deferred = self._deferred, []
        while True:
            for job in candidates:
                if job.key() == key and images + job.request.n <= co.max_batch:
                    batch.append(job)
                    images += job.request.n
                else:
                    self._deferred.append(job)
            wait = deadline - time.monotonic()
            if wait <= 0 or images >= co.max_batch:
                return batch
            try:
                nxt = self._queue.get(timeout=wait)
            except queue.Empty:
                return batch
            if nxt is None:
                self._queue.put(None)
                return batch
            candidates = [nxt]

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            batch = [j for j in self._gather(job) if not j.cancelled.is_set()]
            if not batch:
                continue
            try:
                results = self.pipelines.run(batch)
            except BaseException as exc:
                for j in batch:
                    j.resolve(None, translate(exc, j.offering))
            else:
                for j, r in zip(batch, results, strict=True):
                    j.resolve(r)
