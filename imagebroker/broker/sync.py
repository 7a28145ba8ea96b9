"""`Broker`: the synchronous face of `AsyncBroker`, the same core on a private event loop.

While one thread at a time calls it, the loop runs in that thread (`run_until_complete`): no thread
hop, progress callbacks on the caller's thread, and Ctrl-C cancels the call so that its `cancelled`
row is written. The first time a second thread calls while the loop is busy (or a thread whose own
event loop is running calls, as in a notebook), the loop moves to a thread of its own for good and
every caller hands its call to it (`run_coroutine_threadsafe`): the provider clients and pipelines are
bound to the loop, not to a thread, so they move with it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ..policies.schema import Policy
from ..providers.base import AttemptCallback, ProgressCallback
from ..providers.catalog import Catalog
from ..types import ImageRequest, ImageResult, Plan
from .core import AsyncBroker
from .ledger.store import Ledger

T = TypeVar("T")


class Broker:
    """Routes requests by a policy, falls back on failure, records every attempt and its cost; sync."""

    def __init__(self, policy: str | Path | Policy | None = None, ledger: str | Ledger | None = None,
                 **kw: Any) -> None:
        self._async = AsyncBroker(policy, ledger, **kw)
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._in_caller = False          # a caller's thread is running the loop now
        self._handed_over = False        # a second caller came meanwhile: the loop must get a thread
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<Broker policy={self.policy.name!r} ledger={self.ledger!r}>"

    @property
    def policy(self) -> Policy:
        return self._async.policy

    @property
    def ledger(self) -> Ledger:
        return self._async.ledger

    @property
    def catalog(self) -> Catalog:
        return self._async.catalog

    def plan(self, request: ImageRequest | str | None = None, /, **fields: Any) -> Plan:
        return self._async.plan(request, **fields)

    def generate(self, request: ImageRequest | str | None = None, /, *,
                 progress: ProgressCallback | None = None, on_attempt: AttemptCallback | None = None,
                 timeout: float | None = None, **fields: Any) -> ImageResult:
        """Like `AsyncBroker.generate`; `timeout` (seconds) bounds the whole call, fallbacks included."""
        return self._run(self._async.generate(request, progress=progress, on_attempt=on_attempt,
                                              timeout=timeout, **fields))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._thread is None and _loop_running_here():  # (a notebook): this thread's loop is busy
                self._start_thread()
            here = self._thread is None and not self._in_caller
            if here:
                self._in_caller = True
            elif self._thread is None:  # the loop is busy in another caller's thread: it gets a thread
                self._handed_over = True
            if not here:
                future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        if not here:
            return future.result()
        task = self._loop.create_task(coro)
        try:
            return self._loop.run_until_complete(task)
        except BaseException:  # Ctrl-C in the middle: cancel the call, let it write its row
            if not task.done():
                task.cancel()
                self._loop.run_until_complete(asyncio.wait([task]))
            raise
        finally:
            with self._lock:
                self._in_caller = False
                if self._handed_over and self._thread is None:
                    self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_forever, name="imagebroker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._thread is not None:
            asyncio.run_coroutine_threadsafe(self._async.aclose(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        elif not self._in_caller:
            self._loop.run_until_complete(self._async.aclose())
            self._loop.close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
