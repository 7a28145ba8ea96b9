"""A pool of ComfyUI servers for one offering: requests go to the least loaded healthy server, found from
each server's own answers (`GET /prompt`: its queue; `/system_stats`: its device), checked at most every
`STATUS_TTL_S`. A server that fails is marked down for `DOWN_S` (not checked meanwhile) and tried after the
healthy ones, so a call still has somewhere to go when every server is down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

STATUS_TTL_S = 2.0
DOWN_S = 10.0


@dataclass
class Server:
    url: str
    index: int
    queue: int = 0              # the server's own queue (running + pending), at the last check
    in_flight: int = 0          # this process's calls on it now
    device: str | None = None   # cpu, cuda, mps: what it runs on (sets the price)
    checked_at: float = float("-inf")
    down_until: float = float("-inf")

    @property
    def load(self) -> int:
        return max(self.queue, self.in_flight)

    def up(self, now: float) -> bool:
        return now >= self.down_until


Status = Callable[[str, bool], Awaitable[tuple[int, str | None]]]   # (url, device wanted) -> (queue, device)


class ServerPool:
    def __init__(self, urls: list[str], status: Status) -> None:
        self.servers = [Server(u.rstrip("/"), i) for i, u in enumerate(urls)]
        self._status = status

    async def ranked(self) -> list[Server]:
        """Every server, the ones to try first first: healthy by load (then their order in the policy),
        then the ones down."""
        now = time.monotonic()
        stale = [s for s in self.servers if now - s.checked_at > STATUS_TTL_S and s.up(now)]
        if stale:
            await asyncio.gather(*(self._check(s) for s in stale))
        now = time.monotonic()
        return sorted(self.servers, key=lambda s: (not s.up(now), s.load, s.index))

    async def _check(self, server: Server) -> None:
        try:
            server.queue, device = await self._status(server.url, server.device is None)
        except Exception:
            self.failed(server)
            return
        server.device = device or server.device
        server.checked_at, server.down_until = time.monotonic(), float("-inf")

    def failed(self, server: Server) -> None:
        server.down_until = time.monotonic() + DOWN_S
        server.checked_at = time.monotonic()

    def worked(self, server: Server) -> None:
        server.down_until = float("-inf")
