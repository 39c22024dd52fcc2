"""The service's one door: `create_app(kb, settings, engine=None) -> FastAPI`.

One Answerer (one engine, one retriever) serves the OpenAI-compatible API. The UI is mounted on
the same app by the serve recipe (`kinject.recipes.serve.service_app`), so it answers through the
same Answerer and the model is loaded once.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

import anyio

from fastapi import Depends, FastAPI

from kinject.core.answer import Answerer
from kinject.core.engines import Engine
from kinject.core.kb import KB
from kinject.core.settings import Settings
from kinject.service import chat, completions, embeddings, errors, models
from kinject.service.auth import APIKeyMiddleware
from kinject.service.guards import BodyLimit, TrustedHosts, allowed_names
from kinject.service.protocol import Health
from kinject.service.state import ServiceState, get_state


def create_app(kb: KB, settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The HTTP app for one KB. An engine passed in is shared and left open; one created here, and
    a whole fine-tuned model loaded beside either, are closed when the app shuts down."""
    answerer = Answerer(kb, settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start = getattr(answerer.engine, "start", None)  # engines that start lazily (vLLM): ready before serving
        if start is not None:
            await anyio.to_thread.run_sync(start)
        yield
        await anyio.to_thread.run_sync(answerer.close)

    app = FastAPI(
        title="kinject",
        summary=f"OpenAI-compatible API for the knowledge base {kb.name!r}",
        lifespan=lifespan,
    )
    app.state.kinject = ServiceState(answerer, settings)
    errors.install(app)
    for module in (models, chat, completions, embeddings):
        app.include_router(module.router)

    @app.get("/health", response_model=Health)
    async def health(state: ServiceState = Depends(get_state)) -> Health:
        return Health(
            kb=kb.name,
            engine=answerer.engine.name,
            modes=await anyio.to_thread.run_sync(state.answerer.available_modes),
            active=state.slots.active,
            waiting=state.slots.waiting,
        )

    app.add_middleware(BodyLimit, max_bytes=settings.serve.max_body_bytes)
    key = settings.serve.api_key.get_secret_value()
    if key:
        app.add_middleware(APIKeyMiddleware, key=key)  # before the body is read: a 401 costs nothing
    hosts = allowed_names(settings.serve.host, settings.serve.allowed_hosts)
    if hosts is not None:
        app.add_middleware(TrustedHosts, names=hosts)  # added last: the outermost check
    return app
