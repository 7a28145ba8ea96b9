"""`GET /dashboard`: the page `imagebroker report` writes (`broker/page.py`), drawn live from the ledger for an
admin key (or an open gateway). `?since=` as for `costs`. The page is drawn on a worker thread, one at a time
(pyplot keeps global state), and kept for `FRESH_S`, so a dashboard left open on a wall costs one render per
interval however many look at it."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from starlette.responses import HTMLResponse, JSONResponse, Response

from ..broker.core import AsyncBroker
from ..errors import ImageBrokerError, MissingExtra

FRESH_S = 30.0
_drawing = threading.Lock()   # pyplot's state is the process's: one page drawn at a time, whichever app


class Dashboard:
    """One app's dashboard: its pages by `since`, each kept for FRESH_S."""

    def __init__(self) -> None:
        self._kept: dict[str | None, tuple[float, str]] = {}

    def _draw(self, broker: AsyncBroker, since: str | None) -> str:
        from ..broker.page import render
        from ..broker.report import parse_when

        with _drawing:
            hit = self._kept.get(since)
            if hit is not None and time.monotonic() - hit[0] < FRESH_S:
                return hit[1]
            page = render(broker.ledger, broker.policy, since=parse_when(since))
            self._kept[since] = (time.monotonic(), page)
            return page

    async def answer(self, broker: AsyncBroker, key: Any, since: str | None) -> Response:
        if key is not None and not key.admin:
            return JSONResponse({"error": {"message": "the dashboard needs an admin key", "type":
                                           "invalid_request_error", "param": None, "code": "admin_only"}},
                                status_code=403)
        try:
            page = await asyncio.to_thread(self._draw, broker, since)
        except ImageBrokerError as exc:   # no matplotlib (the `report` extra), a bad --since
            status = 501 if isinstance(exc, MissingExtra) else 400
            return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error", "param": "since",
                                           "code": None}}, status_code=status)
        return HTMLResponse(page, headers={"cache-control": "private, max-age=30"})
