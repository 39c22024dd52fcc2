"""Server-sent events as OpenAI sends them, fed by a blocking engine iterator.

The engine's stream is a plain iterator that blocks per token, so each step runs in a worker
thread. When the client goes away, Starlette cancels the response; `SSEResponse` then closes the
body generator, whose cleanup sets the request's cancel event (the engine stops generating) and
releases the generation slot — a disconnected client costs at most one more token.
"""
from __future__ import annotations

import json
import threading
from typing import AsyncIterator, Iterator, TypeVar

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict, exclude: set[str] | None = None) -> str:
    data = payload.model_dump(exclude=exclude) if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def in_thread(iterator: Iterator[T], cancel: threading.Event) -> AsyncIterator[T]:
    """Items of a blocking iterator, one worker-thread step each. Leaving early (client gone,
    error) sets `cancel` and closes the iterator so the engine stops."""
    end = object()
    finished = False
    try:
        while True:
            item = await anyio.to_thread.run_sync(next, iterator, end)
            if item is end:
                finished = True
                return
            yield item  # type: ignore[misc]
    finally:
        if not finished:
            cancel.set()
        close = getattr(iterator, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close)


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict | None = None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette cancels, but does not close, the body when the client disconnects.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
