"""`kinject ui --kb NAME [--host H] [--port P]`: the Gradio UI alone, without the HTTP API."""
from __future__ import annotations

from typing import Optional

import typer


def ui_cmd(
    ctx: typer.Context,
    kb: str = typer.Option(..., "--kb", help="Knowledge base to chat with."),
    host: Optional[str] = typer.Option(None, "--host", help="Interface to bind (default serve.host: 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default serve.port: 8000)."),
) -> None:
    """Run the chat, compare and KB tabs for one KB (`kinject serve` also mounts them at /ui)."""
    from kinject.core.answer import Answerer
    from kinject.core.settings import settings_from
    from kinject.core.kb import KB
    from kinject.service.auth import ui_auth
    from kinject.ui.app import build_ui, upload_limit

    settings = settings_from(ctx, **{"serve.host": host, "serve.port": port})
    answerer = Answerer(KB.open(settings, kb), settings)
    key = settings.serve.api_key.get_secret_value()
    typer.echo(f"kinject UI for KB {kb!r} on the {answerer.engine.name} engine")
    for mode, why in answerer.unavailable().items():
        typer.echo(f"  not available: {mode} ({why})")
    if key:
        typer.echo("  login: any user name, serve.api_key as the password")
    try:
        build_ui(answerer, settings).launch(
            server_name=settings.serve.host,
            server_port=settings.serve.port,
            auth=ui_auth(key) if key else None,
            show_error=True,
            max_file_size=upload_limit(settings),
        )
    finally:
        answerer.close()
