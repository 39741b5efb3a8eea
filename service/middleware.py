"""ASGI admission control: the request-body limit (uvicorn has none) and a cap on requests in flight."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BadRequest, NotReady, PayloadTooLarge, ServiceError, error_response

# Probes and scrapes are always admitted: an overloaded server must still say so.
ALWAYS_ADMITTED = frozenset({"/healthz", "/readyz", "/metrics"})


class AdmissionMiddleware:
    """Refuse bodies over ``max_bytes`` (at once from Content-Length, or while streaming a chunked body,
    so an oversized upload is never buffered whole), and answer 503 ``overloaded`` beyond
    ``max_concurrent`` requests in flight (each holds its body in memory until it is answered)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        max_concurrent: int,
        on_reject: Callable[[str, int], None] | None = None,
    ) -> None:
        self.app, self.max_bytes, self.max_concurrent, self.on_reject = (
            app,
            max_bytes,
            max_concurrent,
            on_reject,
        )
        self.in_flight = 0

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body larger than {self.max_bytes} bytes", code="body_too_large", limit=self.max_bytes
        )

    async def _refuse(self, err: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
        if self.on_reject is not None:
            self.on_reject(err.code, err.status)
        await error_response(err)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ALWAYS_ADMITTED:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrent:
            err = NotReady(
                f"more than {self.max_concurrent} requests in flight; retry later",
                code="overloaded",
                limit=self.max_concurrent,
                headers={"Retry-After": "1"},
            )
            await self._refuse(err, scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._refuse(BadRequest("invalid Content-Length"), scope, receive, send)
                    return
                if declared > self.max_bytes:
                    await self._refuse(self._too_large(), scope, receive, send)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # rendered by the app's error handlers (413)
            return message

        self.in_flight += 1
        try:
            await self.app(scope, limited, send)
        finally:
            self.in_flight -= 1
