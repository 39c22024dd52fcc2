"""`kinject serve --kb NAME [--host H] [--port P]`: the OpenAI-compatible API and the UI on one app."""
from __future__ import annotations

from typing import Optional

import typer

from kinject.core.engines import Engine
from kinject.core.kb import KB
from kinject.core.settings import Settings


def service_app(kb: KB, settings: Settings, engine: Engine | None = None):
    """The API app for one KB with the Gradio UI mounted at /ui, generating in the API's slots.
    With an API key, Gradio's login (any user name, the key as password) guards the UI."""
    from kinject.service.app import create_app
    from kinject.service.auth import UI_PATH, ui_auth
    from kinject.ui.app import mount

    app = create_app(kb, settings, engine)
    state = app.state.kinject
    key = settings.serve.api_key.get_secret_value()
    mount(app, state.answerer, state.settings, state.slots, path=UI_PATH, auth=ui_auth(key) if key else None)
    return app


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve_cmd(
    ctx: typer.Context,
    kb: str = typer.Option(..., "--kb", help="Knowledge base to serve."),
    host: Optional[str] = typer.Option(None, "--host", help="Interface to bind (default serve.host: 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default serve.port: 8000; 0 picks a free one)."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve on a non-loopback address without serve.api_key."),
) -> None:
    """Serve a KB over an OpenAI-compatible API (models kinject-<mode>) with the UI at /ui."""
    import socket

    import uvicorn

    from kinject.core.answer import model_id
    from kinject.core.settings import settings_from
    from kinject.service.guards import is_loopback, refuse_open_bind

    settings = settings_from(ctx, **{"serve.host": host, "serve.port": port})
    refuse_open_bind(settings.serve.host, bool(settings.serve.api_key.get_secret_value()), insecure)
    knowledge = KB.open(settings, kb)
    family = socket.AF_INET6 if ":" in settings.serve.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.serve.host, settings.serve.port))
    except OSError as e:
        from kinject.core.errors import KinjectError

        raise KinjectError(f"cannot listen on {settings.serve.host}:{settings.serve.port}: {e.strerror}; choose another --port") from None
    bound = sock.getsockname()[1]
    api = service_app(knowledge, settings)
    state = api.state.kinject
    base = f"http://{url_host(settings.serve.host)}:{bound}"
    typer.echo(f"kinject serving KB {kb!r} on the {state.answerer.engine.name} engine")
    typer.echo(f"  models: {', '.join(model_id(m) for m in state.answerer.available_modes())}")
    for mode, why in state.answerer.unavailable().items():
        typer.echo(f"  not available: {model_id(mode)} ({why})")
    typer.echo(f"  API: {base}/v1")
    typer.echo(f"  UI:  {base}/ui")
    if settings.serve.api_key.get_secret_value():
        typer.echo("  API key required: Authorization: Bearer <serve.api_key>; UI login: any user, the key as password")
    elif not is_loopback(settings.serve.host):
        typer.echo(f"  WARNING: --insecure: no API key, and {settings.serve.host} is reachable from the network")
    server = uvicorn.Server(uvicorn.Config(api, log_level="info", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    typer.echo("kinject serve stopped")
