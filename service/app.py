"""The service's one door: `create_app(kb, settings, engine=None) -> FastAPI`.

One Answerer (one engine, one retriever) serves the OpenAI-compatible API and, when the `ui`
package is installed, the Gradio UI mounted at /ui — the UI answers through the same Answerer,
so the model is loaded once.
"""
from __future__ import annotations

import importlib.util
from contextlib import asynccontextmanager

import anyio

from fastapi import Depends, FastAPI

from core.answer import Answerer
from core.engines import Engine
from core.kb import KB
from core.settings import Settings
from service import chat, completions, embeddings, errors, models
from service.auth import UI_PATH, APIKeyMiddleware, ui_auth
from service.guards import BodyLimit, TrustedHosts, allowed_names
from service.protocol import Health
from service.state import ServiceState, get_state


def create_app(kb: KB, settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The HTTP app for one KB. An engine passed in is shared and left open; one created here is
    closed when the app shuts down."""
    answerer = Answerer(kb, settings, engine)
    owns_engine = engine is None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start = getattr(answerer.engine, "start", None)  # engines that start lazily (vLLM): ready before serving
        if start is not None:
            await anyio.to_thread.run_sync(start)
        yield
        if owns_engine:
            await anyio.to_thread.run_sync(answerer.engine.close)

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
    mount_ui(app, app.state.kinject, key)
    return app


def mount_ui(app: FastAPI, state: ServiceState, key: str) -> bool:
    """Mount the Gradio UI at /ui when the ui package is present, generating in the API's slots;
    with an API key, Gradio's login (any user name, the key as password) guards it (see
    service.auth)."""
    if importlib.util.find_spec("ui.app") is None:
        return False
    from ui.app import mount

    mount(app, state.answerer, state.settings, state.slots, path=UI_PATH, auth=ui_auth(key) if key else None)
    return True
