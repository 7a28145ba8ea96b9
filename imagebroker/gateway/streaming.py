"""`stream: true`: the answer as OpenAI's image streaming events (SSE), whatever offering the policy picks.

With `partial_images`, an offering that streams previews (gpt-image) has each passed through as it arrives,
then the completed event. Any other offering, or a call that ends before its first preview, streams its
completed events alone, headers with the cost included (or, before anything was sent, the usual error JSON
and status). A failure after the first preview, when the 200 is already on its way, is OpenAI's `error`
event. A client that goes away mid-stream does not cancel the call: it was paid for, and it is recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response, StreamingResponse

from ..broker.core import AsyncBroker
from ..types import ImageResult, PartialImage
from .openai_shape import cost_headers, error_event, preview_event, stream_events

SSE = "text/event-stream"


async def stream_answer(broker: AsyncBroker, fields: dict[str, Any], body: dict[str, Any],
                        served: Callable[[ImageResult], None], refused: Callable[[Exception], Response]) -> Response:
    """`served(result)` once it is made (metrics); `refused(exc)` is the reply for a call that failed before
    anything was streamed."""
    edit = "images" in body
    previews: asyncio.Queue[PartialImage | None] = asyncio.Queue()

    def progress(step: int, total: int, partial: PartialImage | None = None) -> None:
        if partial is not None:
            previews.put_nowait(partial)

    call = asyncio.ensure_future(broker.generate(**fields, progress=progress))
    call.add_done_callback(lambda _: previews.put_nowait(None))
    first = await previews.get()
    if first is None:   # done (or failed) before any preview, as every call that sends none: the headers
        try:            # can say what it cost
            result = call.result()
        except Exception as exc:
            return refused(exc)
        served(result)
        return StreamingResponse(iter(stream_events(result, edit)), media_type=SSE, headers=cost_headers(result))

    async def events() -> AsyncIterator[str]:
        item: PartialImage | None = first
        while item is not None:
            yield preview_event(item, body, edit)
            item = await previews.get()
        try:
            result = call.result()
        except Exception as exc:
            yield error_event(exc)
            return
        served(result)
        for event in stream_events(result, edit):
            yield event

    return StreamingResponse(events(), media_type=SSE)
