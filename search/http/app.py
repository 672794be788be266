"""The app factory both services use, and what every app of theirs has.

- Every error is `{"error": "..."}`: a request that does not validate is a 400 naming the field
  (FastAPI's 422 and its own error shape are neither sent nor documented), and the store's typed
  errors (search.index.errors) are turned into statuses by `error_status`.
- A POST body is JSON whatever Content-Type the client sent, and at most MAX_BODY_BYTES (`JsonBody`).
- The API documents itself at /openapi.json, /docs (Swagger UI) and /redoc, whose scripts and styles
  are served from the `fastapi-offline` package: the pages render on a machine without a network.
- `serve` runs an app with uvicorn on a socket bound before the model loads, closing connections
  whose request headers trickle (`HeaderTimeoutProtocol`).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from search.filters import FilterError
from search.index.errors import IndexMismatch, IndexUnavailable

__all__ = ["HEADER_TIMEOUT_SECS", "MAX_BODY_BYTES", "PAGE", "BadRequest", "HeaderTimeoutProtocol", "JsonBody",
           "HeadAsGet", "error", "json_param", "listen", "new_app", "port", "serve"]

MAX_BODY_BYTES = 1024 * 1024  # a 20,000-d vector as JSON is ~0.5 MB; anything larger is refused unread
HEADER_TIMEOUT_SECS = 10.0
PAGE = (Path(__file__).resolve().parents[1] / "static" / "index.html").read_text(encoding="utf-8")


class BadRequest(ValueError):
    """A request the service understood and refuses: a 400 with this message."""


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def new_app(title: str, on_bad_request: Callable[[], None] = lambda: None,
            refused: tuple[type[Exception], ...] = (), on_unavailable: Callable[[], None] = lambda: None) -> FastAPI:
    """A FastAPI app with the services' error shape, body handling and offline API docs. `refused`:
    more exceptions that are a 400 with their message; `on_bad_request` hears of each 400 and
    `on_unavailable` of each 503 (an index whose engine does not answer), for the metrics."""
    app = FastAPIOffline(title=title)
    app.add_middleware(JsonBody)
    app.add_middleware(HeadAsGet)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError):
        on_bad_request()
        messages = ["the body is not valid JSON" if item["type"] == "json_invalid" else
                    f"{'.'.join(str(p) for p in item['loc'][1:]) or 'body'}: {item['msg']}" for item in e.errors()]
        return error(400, "; ".join(messages))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    for kind in (BadRequest, FilterError, IndexMismatch, *refused):
        @app.exception_handler(kind)
        async def refused(_request: Request, e: Exception):
            on_bad_request()
            return error(400, str(e))

    @app.exception_handler(IndexUnavailable)
    async def unavailable(_request: Request, e: IndexUnavailable):
        on_unavailable()
        return error(503, str(e))

    _document_errors_as_sent(app)
    return app


def _document_errors_as_sent(app: FastAPI) -> None:
    """FastAPI documents a 422 with its own error shape; these services answer 400 `{"error"}` instead."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def json_param(name: str, value: str | None) -> Any:
    """A query parameter holding JSON (a filter); FilterError naming it when it is not."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as e:
        raise FilterError(f"{name}: not valid JSON ({e})") from None
    except RecursionError:
        raise FilterError(f"{name}: nested too deep to read") from None


class JsonBody:
    """ASGI middleware: a POST body is JSON, whatever Content-Type the client sent (or none), and
    at most `limit` bytes: a larger one is answered 413 before it is read or parsed."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await error(413, f"the body is over {self.limit} bytes")(scope, receive, send)
            return
        body, more = b"", True
        while more:  # a chunked body is counted as it comes
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await error(413, f"the body is over {self.limit} bytes")(scope, receive, send)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, replay, send)


class HeadAsGet:
    """ASGI middleware: HEAD answers as GET does, without the body (probes send either; FastAPI's routes
    answer GET only, and a HEAD was a 405)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(dict(scope, method="GET"), receive, headers_only)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing a connection whose first request's headers have not all
    arrived within `header_timeout` seconds (uvicorn itself waits for ever: idle sockets pile up)."""

    header_timeout = HEADER_TIMEOUT_SECS

    def connection_made(self, transport):
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self):
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self):
        self._header_timer.cancel()
        super().on_headers_complete()

    def connection_lost(self, exc):
        self._header_timer.cancel()
        super().connection_lost(exc)


def port(value: str) -> int:
    """An argparse type: a TCP port."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return number


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port fails in a moment, not after it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    return sock


def serve(app, sock: socket.socket, ready: str, log: logging.Logger, **config) -> None:
    """Runs `app` with uvicorn on the bound `sock`, logging `ready` once it accepts connections
    (what a user, a test or a deployment waits for)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                log.info(ready)

    Server(uvicorn.Config(app, log_level="warning", **config)).run(sockets=[sock])
