"""What every route shares: the Answerer (one engine, one retriever), the settings, and the
slots that bound concurrency.

Engine calls block, so routes run them in worker threads (anyio.to_thread) and the event loop
stays free for other clients. At most `serve.max_concurrency` requests do model work at once
(retrieval, tokenizing, embedding, generating); up to `serve.max_queue` more wait in arrival
order, and beyond that the service answers 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import Request

from kinject.core.answer import ALL_MODES, AUTO, MODEL_PREFIX, MODES, Answerer, model_id
from kinject.core.settings import Settings
from kinject.service.errors import APIError

RETRY_AFTER_S = 1


class Slot:
    """One admitted request's hold on a slot. Released once, by whoever holds it last: the route,
    or the streamed response it was passed on to."""

    def __init__(self, release: Callable[[], None]):
        self._release: Callable[[], None] | None = release

    def pass_on(self) -> "Slot":
        """Hand the hold to a streamed response; leaving the route's `async with` keeps it."""
        release, self._release = self._release, None
        assert release is not None, "the slot was already released"
        return Slot(release)

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class Slots:
    def __init__(self, max_concurrency: int, max_queue: int):
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self._sem = asyncio.Semaphore(max_concurrency)
        self.waiting = 0
        self.active = 0

    def _check_room(self) -> None:
        if self.active >= self.max_concurrency and self.waiting >= self.max_queue:
            raise APIError(
                503,
                f"the server is busy: {self.active} requests running and {self.waiting} waiting (serve.max_queue); retry later",
                code="server_busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Wait in the queue for a slot (503 when the queue is full); released on leaving unless
        passed on."""
        self._check_room()
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        held = Slot(self._release)
        try:
            yield held
        finally:
            held.release()

    def _release(self) -> None:
        self.active -= 1
        self._sem.release()


class ServiceState:
    def __init__(self, answerer: Answerer, settings: Settings):
        self.answerer, self.settings = answerer, settings
        self.slots = Slots(settings.serve.max_concurrency, settings.serve.max_queue)

    def mode_for(self, model: str) -> str:
        """The mode a request's `model` names (`kinject-rag`, or plainly `rag`), checked against
        what the KB has built: unknown or unbuilt modes are a 404 naming what to do."""
        mode = model.removeprefix(MODEL_PREFIX)
        if mode not in ALL_MODES:
            listed = ", ".join(model_id(m) for m in self.answerer.available_modes())
            raise APIError(404, f"the model {model!r} does not exist; available: {listed}", param="model", code="model_not_found")
        self.answerer.check(mode)  # ModeUnavailable -> 404 naming the command that builds it
        return mode

    def describe(self, mode: str) -> str:
        if mode == AUTO:
            return "router: picks a mode per query from the retrieval scores"
        return MODES[mode].description


def get_state(request: Request) -> ServiceState:
    return request.app.state.kinject
