"""SIGTERM drains a worker: `/readyz` and every new `/v1/` request answer 503 (with Retry-After, so clients
and load balancers go to another worker), the calls and the job under way finish, up to a deadline, and
only then does uvicorn shut down (its own shutdown closes the listener and waits for nothing more). Their
rows are committed by then; the broker's backlog is flushed when the app stops. A second SIGTERM, or
Ctrl-C, stops at once, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from types import FrameType
from typing import Any

log = logging.getLogger("imagebroker.gateway")
DRAIN_ENV = "IMAGEBROKER_DRAIN_S"
DEFAULT_DRAIN_S = 30.0

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class Drain:
    """Counts what is under way and holds SIGTERM back until it has finished (or `deadline_s` passed)."""

    def __init__(self, deadline_s: float = DEFAULT_DRAIN_S) -> None:
        self.deadline_s = deadline_s
        self.draining = False
        self.in_flight = 0
        self._previous: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Take SIGTERM from whoever holds it (uvicorn), to hand it on once drained. Only the main thread may."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._loop = asyncio.get_running_loop()
        self._previous = signal.signal(signal.SIGTERM, self._on_term)

    def uninstall(self) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGTERM) == self._on_term:
            signal.signal(signal.SIGTERM, self._previous)
        self._previous = None

    def _on_term(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self._loop is None:   # the second one: stop now
            self._hand_on(sig, frame)
            return
        self.draining = True
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._wait())

    async def _wait(self) -> None:
        t0 = time.monotonic()
        log.info("SIGTERM: draining %d request(s) under way, for %g s at most; new ones get 503",
                 self.in_flight, self.deadline_s)
        while self.in_flight and time.monotonic() - t0 < self.deadline_s:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("drain deadline passed with %d request(s) under way; stopping anyway", self.in_flight)
        else:
            log.info("drained in %.2f s", time.monotonic() - t0)
        self._hand_on(signal.SIGTERM, None)

    def _hand_on(self, sig: int, frame: FrameType | None) -> None:
        previous = self._previous
        if callable(previous):
            previous(sig, frame)
            return
        self.uninstall()   # nobody else took it: the default (stop the process)
        signal.raise_signal(sig)


class DrainMiddleware:
    """Counts the requests under way; while draining, a new `/v1/` request gets 503 and `Connection: close`."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["path"].startswith("/v1/"):
            body = json.dumps({"error": {"message": "this gateway worker is shutting down; retry (another worker "
                                                    "will answer)", "type": "server_error", "param": None,
                                         "code": "shutting_down"}}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
