"""The cheap parts of the request hot path (docs/performance.md, "Per-request CPU"): JSON encoding and
decoding with orjson when installed (the ``serve`` extra pins it; the stdlib ``json`` otherwise), and
the rule for decoding small images inline on the event loop instead of a round trip through the decode
pool (two thread hand-offs cost more than decoding a thumbnail).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from starlette.responses import JSONResponse as _StarletteJSON

try:  # pragma: no cover - which branch runs depends on the environment
    import orjson
except ImportError:  # pragma: no cover
    orjson = None  # type: ignore[assignment]

# Images at most this many pixels (from the header) and bytes are decoded on the event loop: a 28x28 PNG
# decodes + preprocesses in ~50 us, while a pool round trip costs ~150-300 us of CPU in hand-offs. Larger
# images go to the pool so the loop keeps serving other requests while they decode.
INLINE_MAX_PIXELS = 128 * 128
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_IMAGES = 4

if orjson is not None:
    _OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

    def dumps(content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTS)

    def loads(data: bytes | str) -> Any:
        return orjson.loads(data)

    JSONDecodeError: type[Exception] = orjson.JSONDecodeError
else:  # pragma: no cover

    def dumps(content: Any) -> bytes:  # type: ignore[unreachable]  # mypy assumes orjson is installed
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    def loads(data: bytes | str) -> Any:
        return json.loads(data)

    JSONDecodeError = json.JSONDecodeError


class JSONResponse(_StarletteJSON):
    """Starlette's JSONResponse rendered with orjson (numpy arrays serialized natively, no ``tolist``)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


def array_for_json(x: np.ndarray) -> Any:
    """What to put in a JSON body for ``x``: the array itself when orjson serializes it natively (C
    contiguous, float32/float16/int), else nested lists."""
    if orjson is not None and x.dtype.kind in "fiub" and x.dtype.itemsize <= 8:
        return np.ascontiguousarray(x)
    return x.tolist()


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF marker, scanning at most the first 64 KiB."""
    i, n = 2, min(len(data), 1 << 16)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


def declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, JPEG or GIF header without opening the image (None: unknown)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_size(data)
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_size(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return w, h
    return None


def decode_inline(blobs: list[bytes]) -> bool:
    """Whether these images are small enough to decode on the event loop (see INLINE_MAX_*)."""
    if len(blobs) > INLINE_MAX_IMAGES:
        return False
    for b in blobs:
        if len(b) > INLINE_MAX_BYTES:
            return False
        size = declared_size(b)
        if size is None or size[0] * size[1] > INLINE_MAX_PIXELS:
            return False
    return True


class EmbedFastPath:
    """ASGI middleware: ``POST /embed`` with no query string, no ``X-Request-Timeout`` and no API keys
    configured (the common call: default pooling, float32, JSON or .npy by Accept) calls the route's own
    handler directly with its defaults, skipping FastAPI's dependency solving and per-request parameter
    validation (~0.4 ms of CPU per request, 40% of the event loop's share: docs/performance.md). Every
    other request, and anything the route itself would answer differently, goes through FastAPI as
    before; errors are rendered by the same ``error_response`` and counted the same way."""

    def __init__(self, app: Any, runtime: Any, on_reject: Any = None) -> None:
        self.app, self.runtime, self.on_reject = app, runtime, on_reject
        self._route: Any = None
        self._handler: Any = None

    def _eligible(self, scope: Any) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/embed":
            return False
        if scope.get("query_string") or self.runtime.settings.api_keys:
            return False
        return not any(name == b"x-request-timeout" for name, _ in scope["headers"])

    def _bind(self) -> None:
        from fastapi.routing import APIRoute

        from .routers import embed as embed_router

        for route in embed_router.router.routes:
            if isinstance(route, APIRoute) and route.path == "/embed" and "POST" in (route.methods or ()):
                self._route = route
        self._handler = embed_router.embed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not self._eligible(scope):
            await self.app(scope, receive, send)
            return
        if self._handler is None:
            self._bind()
        if self._route is None:
            await self.app(scope, receive, send)
            return
        import asyncio
        import logging

        from starlette.requests import Request

        from .errors import ServiceError, error_response

        scope["route"] = self._route  # metrics label and the route-aware error hints
        request = Request(scope, receive)
        runtime = self.runtime
        deadline = asyncio.get_running_loop().time() + runtime.settings.request_timeout_s
        try:
            response = await self._handler(request, runtime, deadline, accept=request.headers.get("accept"))
        except ServiceError as e:
            if self.on_reject is not None:
                self.on_reject(e.code, e.status)
            response = error_response(e)
        except Exception as e:  # as the app's catch-all handler: logged, 500 without internals
            logging.getLogger("service").error("unhandled error: %s", type(e).__name__, exc_info=e)
            if self.on_reject is not None:
                self.on_reject("internal_error", 500)
            response = error_response(ServiceError("internal error"))
        await response(scope, receive, send)
