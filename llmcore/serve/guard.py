"""What stands between the network and the service: an API key, body size, error shape, error
handlers.

With a key (``llmcore serve --api-key``), every route but the chat page and ``/health`` needs
``Authorization: Bearer <key>``, as OpenAI's API and the official clients send it; the key is
compared in constant time (``hmac.compare_digest``), so the time of a refusal says nothing
of how much of a guess was right.

Every error leaves as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (the shape
the official clients parse), and a validation error names the field in ``param`` and in the
message, e.g. ``body.messages.0.role: Input should be 'system', 'developer', 'user' or
'assistant'``.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, TypedDict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("llmcore.serve.app")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(TypedDict):
    """An error response in the OpenAI API's shape: ``{"error": {...}}``."""

    error: ErrorDetail


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> ErrorBody:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def _json(status: int, message: str, param: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return _json(exc.status, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = []
        for e in errors[:5]:
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            if e.get("type") == "json_invalid":
                msg = "the body is not valid JSON (" + str(e.get("ctx", {}).get("error", msg)) + ")"
            parts.append(f"{_field(tuple(e.get('loc', ())))}: {msg}")
        param = _field(tuple(errors[0].get("loc", ()))) if errors else None
        return _json(422, "; ".join(parts) or "invalid request", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _json(500, "internal error; the server logged the cause")


class ApiKey:
    """Refuse a request without ``Authorization: Bearer <key>`` with OpenAI's 401 (the
    official client raises ``AuthenticationError``), before the body is read. The chat page
    and ``/health`` stay open: the page asks for the key and sends it with each request."""

    OPEN = frozenset({"/", "/health"})

    def __init__(self, app: ASGIApp, key: str) -> None:
        if not key:
            raise ValueError("the API key is empty")
        self.app, self.key = app, key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.OPEN:
            await self.app(scope, receive, send)
            return
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            what = "no API key was given" if not auth else "the API key is not this server's"
            await _json(401, f"{what}: send the header 'Authorization: Bearer <key>' (the "
                             "OpenAI client's api_key)", None, "invalid_api_key",
                        {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with a 413 before the app reads them.

    A declared Content-Length over the limit is refused at once; a body without one (chunked)
    is counted as it arrives and refused when it passes the limit.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = _json(413, f"the request body is over {self.limit} bytes", "body")
        if declared is not None:
            if not declared.isdigit():
                await _json(400, "Content-Length is not a number")(scope, receive, send)
                return
            if int(declared) > self.limit:
                await too_big(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # no length declared: read it here, bounded, then hand the app the same messages
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await too_big(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
