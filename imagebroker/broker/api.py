"""`generate()` and `agenerate()`: one call, on a default broker (policy from $IMAGEBROKER_POLICY,
./imagebroker.yaml, or the built-in default; ledger from $IMAGEBROKER_LEDGER_URL or the user data dir)."""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any

from ..types import ImageRequest, ImageResult
from .core import AsyncBroker
from .sync import Broker

_lock = threading.Lock()
_sync: Broker | None = None
_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncBroker] = weakref.WeakKeyDictionary()


def generate(prompt: str | ImageRequest, **fields: Any) -> ImageResult:
    """Generate images for `prompt` (or a whole ImageRequest), routed by the default policy."""
    global _sync
    with _lock:
        if _sync is None:
            _sync = Broker()
    return _sync.generate(prompt, **fields)


async def agenerate(prompt: str | ImageRequest, **fields: Any) -> ImageResult:
    """The async twin of `generate`."""
    loop = asyncio.get_running_loop()
    broker = _async.get(loop)
    if broker is None:
        broker = _async[loop] = AsyncBroker()
    return await broker.generate(prompt, **fields)
