"""What every route shares: the Answerer (one engine, one retriever), the settings, and the
slots that bound concurrency (core.policy.Slots; a full queue is a 503 with Retry-After).

Engine calls block, so routes run them in worker threads (anyio.to_thread) and the event loop
stays free for other clients.
"""
from __future__ import annotations

from fastapi import Request

from kinject.core.answer import ALL_MODES, AUTO, MODEL_PREFIX, MODES, Answerer, model_id
from kinject.core.policy import Slots
from kinject.core.settings import Settings
from kinject.service.errors import APIError


class ServiceState:
    def __init__(self, answerer: Answerer, settings: Settings):
        self.answerer, self.settings = answerer, settings
        self.slots = Slots.from_settings(settings)

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
