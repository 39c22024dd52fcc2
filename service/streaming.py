"""Blocking engine work while the client may go away: server-sent events as OpenAI sends them,
and whole (non-streamed) answers.

The engine's stream is a plain iterator that blocks per token, so each step runs in a worker
thread. When the client goes away, Starlette cancels the response; `SSEResponse` then closes the
body generator, whose cleanup sets the request's cancel event (the engine stops generating) and
releases the slot — a disconnected client costs at most one more token. A non-streamed answer
runs in one worker-thread call (`unless_gone`) while the request's receive channel is watched for
the disconnect, which sets the same kind of cancel event.
"""
from __future__ import annotations

import json
import threading
from typing import AsyncIterator, Callable, Iterator, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kinject.core.policy import Busy, Slot
from kinject.service.errors import APIError, ClientGone, from_kinject, internal_error, log

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


async def unless_gone(request: Request, work: Callable[[threading.Event], T]) -> T:
    """`work(cancel)` in a worker thread. If the client disconnects first, `cancel` is set (the
    engine stops within a token), the work is waited for, and ClientGone is raised; whatever it
    returned or raised after the cancel is dropped."""
    cancel = threading.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel.set()

    error: Exception | None = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        try:
            result = await anyio.to_thread.run_sync(work, cancel)
        except Exception as e:  # raised below, outside the task group (which would wrap it)
            error = e
        tasks.cancel_scope.cancel()
    if cancel.is_set():
        raise ClientGone()
    if error is not None:
        raise error
    return result


def sse(payload: BaseModel | dict, exclude: set[str] | None = None) -> str:
    data = payload.model_dump(exclude=exclude) if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_error(e: Exception) -> APIError:
    """What a reader is told when an answer fails once it has started (an API stream whose
    headers are sent, or an answer on the UI's page): a full queue as it is; anything else is a
    bug or an engine failure whose text can hold paths and settings, so the log gets the details
    and the reader the internal error."""
    if isinstance(e, Busy):
        return from_kinject(e)
    log.error("streamed generation failed", exc_info=e)
    return internal_error()


def closing_events(error: APIError | None, usage: Callable[[], str] | None) -> Iterator[str]:
    """A stream's last events, after its slot is released: the error event if generation failed
    (headers are sent, so it is reported in the stream, as OpenAI does), else the usage chunk when
    the client asked for one, then [DONE]."""
    if error is not None:
        yield sse(error.payload())
    elif usage is not None:
        yield usage()
    yield DONE


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
    """A stream that holds the request's slot: the body releases it when generation ends, and
    this response in any case once it is done (a body never started releases nothing itself)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], slot: Slot, headers: dict | None = None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette cancels, but does not close, the body when the client disconnects.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            self.slot.release()
