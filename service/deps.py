"""FastAPI dependencies: the shared runtime, API-key auth, the request deadline."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from .errors import Unauthorized
from .runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key")


async def require_api_key(request: Request, runtime: RuntimeDep) -> None:
    """Checks ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` when keys are configured.

    Every configured key is compared (no early exit) with ``hmac.compare_digest``, so timing does not
    reveal which key or how much of it matched."""
    keys = runtime.settings.api_keys
    if not keys:
        return
    presented = _presented_key(request)
    if presented is None:
        raise Unauthorized()
    # digests first: equal lengths, so the comparison time does not reveal the key's length either
    given = hashlib.sha256(presented.encode()).digest()
    match = False
    for key in keys:
        match |= hmac.compare_digest(given, hashlib.sha256(key.get_secret_value().encode()).digest())
    if not match:
        raise Unauthorized()


# Bounds of the X-Request-Timeout header: below a second a request can miss its deadline on a busy CPU
# for reasons of its own making (a 5e-324 s deadline always does), so such values are refused (422).
MIN_REQUEST_TIMEOUT_S = 1.0
MAX_REQUEST_TIMEOUT_S = 3600.0


async def request_deadline(
    runtime: RuntimeDep,
    x_request_timeout: Annotated[
        float | None,
        Header(
            ge=MIN_REQUEST_TIMEOUT_S,
            le=MAX_REQUEST_TIMEOUT_S,
            allow_inf_nan=False,
            description=f"Seconds this request may take, {MIN_REQUEST_TIMEOUT_S:g} to "
            f"{MAX_REQUEST_TIMEOUT_S:g} (capped at the server's request_timeout_s); outside that: 422.",
        ),
    ] = None,
) -> float:
    """The request's deadline in event-loop time: the server's timeout, or less if the client asks."""
    timeout = runtime.settings.request_timeout_s
    if x_request_timeout is not None:
        timeout = min(timeout, x_request_timeout)
    return asyncio.get_running_loop().time() + timeout


DeadlineDep = Annotated[float, Depends(request_deadline)]
