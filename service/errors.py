"""Domain errors and their one mapping to HTTP.

Every error a client can cause is a :class:`ServiceError` subclass with a status, a stable ``code`` and a
message that names the problem (and the limit, where one applies). The handlers installed by
:func:`install_error_handlers` render all of them, FastAPI's validation errors and Starlette's HTTP
errors as ``{"error": {"code", "message", "limit"?}}``. Anything else becomes a 500 with a generic
message: exception text never reaches the client (it may hold paths or internals).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_logger = logging.getLogger("service")


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        limit: int | float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.limit = limit
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.limit is not None:
            err["limit"] = self.limit
        return {"error": err}


class BadRequest(ServiceError):
    """Malformed input: empty body, undecodable image, bad base64, bad JSON."""

    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(
        self, message: str = "missing or invalid API key (Authorization: Bearer KEY or X-API-Key)"
    ) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ServiceError):
    status, code = 404, "not_found"


class NotAcceptable(ServiceError):
    """The response type the client asks for (Accept) cannot hold this answer."""

    status, code = 406, "not_acceptable"


class PayloadTooLarge(ServiceError):
    """A size limit: body bytes, images per request, pixels per image."""

    status, code = 413, "too_large"


class UnsupportedMediaType(ServiceError):
    """A content type or image format the service does not accept."""

    status, code = 415, "unsupported_media_type"


class Unprocessable(ServiceError):
    """Well-formed but unusable input: an option out of range, an image too small, a bad mask."""

    status, code = 422, "invalid"


class QueueFull(ServiceError):
    status, code = 429, "queue_full"

    def __init__(self, message: str, *, limit: int, retry_after_s: float) -> None:
        super().__init__(message, limit=limit, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class NotReady(ServiceError):
    """Loading, shutting down, or unhealthy after repeated inference failures."""

    status, code = 503, "not_ready"


class TaskUnsupported(ServiceError):
    """The bundle has the task but the chosen backend cannot run it (e.g. torch has no dense heads)."""

    status, code = 501, "task_unsupported_by_backend"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class InferenceFailed(ServiceError):
    status, code = 500, "inference_failed"


def error_response(err: ServiceError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = [str(x) for x in e.get("loc", ())]
        where = f"{loc[0]} parameter '{'.'.join(loc[1:])}'" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, on_error: Callable[[str, int], None] | None = None) -> None:
    """Register the handlers; ``on_error(code, status)`` counts rejections (metrics)."""

    def count(code: str, status: int) -> None:
        if on_error is not None:
            on_error(code, status)

    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        count(exc.code, exc.status)
        if exc.status >= 500:
            _logger.warning("%s (%d): %s", exc.code, exc.status, exc.message)
        return error_response(exc)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        err = Unprocessable(_validation_message(exc), code="invalid_option")
        count(err.code, err.status)
        return error_response(err)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        err = ServiceError(
            str(exc.detail), code=codes.get(exc.status_code, "http_error"),
            headers=dict(exc.headers) if exc.headers else None,
        )
        err.status = exc.status_code
        count(err.code, err.status)
        return error_response(err)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        _logger.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        count("internal_error", 500)
        return error_response(ServiceError("internal error"))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
