"""Checks every HTTP request passes before the API key and the routes see it.

- Host: a web page can reach a server on 127.0.0.1 from the user's browser by DNS rebinding
  (its own name, re-pointed at 127.0.0.1): the browser then sends that name as `Host`. On a
  loopback address, and wherever `serve.allowed_hosts` is set, a Host that is not localhost,
  127.0.0.1, ::1, serve.host or an allowed name is a 400, whatever the route (the UI included).
- Body size: an API body over `serve.max_body_bytes` is a 413, whether it declares its length or
  arrives in chunks; it is read into memory only up to the limit. The UI's uploads at /ui are
  Gradio's and have their own limit.
"""
from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kinject.service.auth import UI_PATH
from kinject.service.errors import error_body

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_open_bind(host: str, has_key: bool, insecure: bool) -> None:
    """Serving a non-loopback address without an API key lets anyone who can reach it use the
    API and the UI; only an explicit --insecure allows it."""
    if is_loopback(host) or has_key or insecure:
        return
    from kinject.core.errors import KinjectError

    raise KinjectError(
        f"refusing to serve on {host} without an API key: anyone who can reach that address could use the API and the UI "
        "(which can ingest files into the KB). Set serve.api_key (e.g. KINJECT_SERVE__API_KEY=...), or pass --insecure to "
        "serve it open anyway"
    )


def host_name(header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_names(serve_host: str, allowed: list[str]) -> set[str] | None:
    """The Host names to accept, or None to accept any (a public bind with no list given)."""
    if "*" in allowed or (not allowed and not is_loopback(serve_host)):
        return None
    return LOOPBACK_NAMES | {serve_host.strip("[]").lower()} | {host_name(h) for h in allowed}


async def _refuse(status: int, message: str, code: str, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await JSONResponse(error_body(status, message, code=code), status_code=status)(scope, receive, send)


class TrustedHosts:
    def __init__(self, app: ASGIApp, names: set[str]):
        self.app, self.names = app, names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            name = host_name(Headers(scope=scope).get("host", ""))
            if name not in self.names:
                message = f"unknown Host {name!r}: this server answers to {', '.join(sorted(self.names))} (serve.allowed_hosts)"
                await _refuse(400, message, "invalid_host", scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path == UI_PATH or path.startswith(UI_PATH + "/"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            body.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            # The body once, then the real channel: routes watch it for the client's disconnect.
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than {self.max_bytes} bytes (serve.max_body_bytes)"
        await _refuse(413, message, "request_too_large", scope, receive, send)
