"""Optional API key (setting `serve.api_key`, e.g. env KINJECT_SERVE__API_KEY).

When set, every route but GET /health needs `Authorization: Bearer <key>`; a missing or wrong
key is a 401 in OpenAI shape. Keys are compared with hmac.compare_digest (constant time).

The Gradio UI at /ui cannot send a Bearer header from a browser, so it is protected by Gradio's
own login instead: any user name, the API key as password (`ui_auth`). Its routes are therefore
left to Gradio by the middleware below; Gradio answers 401 on every UI route until logged in.
"""
from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kinject.service.errors import error_body

OPEN_PATHS = {"/health"}
UI_PATH = "/ui"


def key_matches(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode(), key.encode())


def ui_auth(key: str):
    """Gradio `auth=` callable: any user name, the API key as password."""

    def check(username: str, password: str) -> bool:
        return key_matches(password or "", key)

    return check


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path == UI_PATH or path.startswith(UI_PATH + "/"):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await self._deny("missing API key: send the header `Authorization: Bearer <key>`", scope, receive, send)
        elif not key_matches(token.strip(), self.key):
            await self._deny("incorrect API key provided", scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    async def _deny(message: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(401, message, code="invalid_api_key")
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
