"""The application factory: ``create_app(settings)``.

No work at import time: the bundle is loaded, verified and warmed up by the lifespan, so tests and tools
can build apps with different settings in one process (and a bad bundle stops start-up, not import).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from .backends import Backend
from .errors import install_error_handlers
from .fast import EmbedFastPath
from .metrics import Metrics, MetricsMiddleware
from .middleware import AdmissionMiddleware
from .routers import ROUTERS
from .runtime import Runtime, StartupError
from .settings import Settings

_logger = logging.getLogger("service")

__version__ = "0.1.0"


def _operation_id(route: APIRoute) -> str:
    return route.name  # stable OpenAPI operation ids (embed, reconstruct, ...) for generated clients


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> FastAPI:
    """A FastAPI app serving the bundle in ``settings.model_dir``.

    ``backend``: an unloaded backend to use instead of selecting one (tests inject fakes this way)."""
    settings = settings or Settings()
    metrics = Metrics()
    runtime = Runtime(settings, metrics, backend=backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _logger.info("settings: %s", settings.public_dict())
        try:
            await runtime.start()
        except StartupError as e:
            _logger.error("%s", e)  # one clear line; uvicorn then prints the traceback and exits (status 3)
            raise
        try:
            yield
        finally:
            await runtime.stop()  # uvicorn has already drained connections; finish queued work

    app = FastAPI(
        title="cae-service",
        version=__version__,
        summary="Context Autoencoder image encoders: embeddings and masked-patch reconstructions.",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        docs_url=None,  # /docs and /redoc come from routers/docs.py: offline assets, no CDN
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.settings = settings

    def count_rejection(code: str, status: int) -> None:
        metrics.rejections.labels(code).inc()

    install_error_handlers(app, count_rejection)
    for router in ROUTERS:
        app.include_router(router)
    # the common /embed call without FastAPI's per-request dependency solving (service/fast.py)
    app.add_middleware(EmbedFastPath, runtime=runtime, on_reject=count_rejection)
    # added last = outermost: metrics see every response, including admission refusals
    app.add_middleware(
        AdmissionMiddleware,
        max_bytes=settings.max_body_bytes,
        max_concurrent=settings.max_concurrent_requests,
        on_reject=count_rejection,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
