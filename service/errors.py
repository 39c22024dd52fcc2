"""Every failure as an OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}`.

Status codes follow OpenAI: a request the server cannot accept is 400 (FastAPI's validation
errors and malformed JSON included, not 422), a missing or wrong key 401, an unknown model 404,
an unknown route 404, a wrong method 405, a body over `serve.max_body_bytes` 413, a full queue
503 (with Retry-After). A 500 means a bug in kinject and is never the answer to bad input; its
body, like a failed stream's, says only that the server log has the details: exception text can
hold paths and settings, and callers are not told them.
"""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kinject.core.answer import ModeUnavailable
from kinject.core.errors import KinjectError
from kinject.core.policy import Busy, PromptTooLong
from kinject.service.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("kinject.service")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


INTERNAL_ERROR = "internal error; the server log has the details"


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def payload(self) -> dict:
        """The `{"error": ...}` body, also sent as the last event of a stream that fails."""
        return error_body(self.status, self.message, param=self.param, code=self.code, type=self.type)


class ClientGone(Exception):
    """The client disconnected before its answer was ready (see service.streaming.unless_gone)."""


CLIENT_GONE = 499  # nginx's "client closed request": for the access log; nobody receives it


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None) -> dict:
    kind = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code)).model_dump()


def error_response(err: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.payload(), status_code=err.status, headers=headers or err.headers)


def internal_error() -> APIError:
    return APIError(500, INTERNAL_ERROR, type="server_error")


def from_kinject(e: KinjectError) -> APIError:
    """Map the answering core's errors onto statuses."""
    if isinstance(e, ModeUnavailable):
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, PromptTooLong):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, Busy):
        return APIError(503, str(e), code="server_busy", headers={"Retry-After": str(e.retry_after_s)})
    return APIError(400, str(e))


_SCALAR_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str | None:
    # A union's members add their type to the location ("stop.list[str].1"): name the field only.
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in _SCALAR_TAGS))]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(KinjectError)
    async def _kinject(request: Request, e: KinjectError):
        return error_response(from_kinject(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            return error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        if "json" not in request.headers.get("content-type", "") and any(tuple(err.get("loc", ())) == ("body",) for err in errs):
            return error_response(APIError(400, "send the request body as a JSON object with the header Content-Type: application/json", code="invalid_json"))
        first = errs[0] if errs else {}
        param = _param(tuple(first.get("loc", ())))
        msgs = []
        for err in errs[:5]:
            where = _param(tuple(err.get("loc", ()))) or "body"
            msgs.append(f"{where}: {err.get('msg', 'invalid value').removeprefix('Value error, ')}")
        return error_response(APIError(400, "invalid request: " + "; ".join(msgs), param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        status = e.status_code
        if status == 404:
            message = f"no route {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = e.detail if isinstance(e.detail, str) else HTTPStatus(status).phrase
        return error_response(APIError(status, message), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(internal_error())
