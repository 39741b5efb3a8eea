"""Liveness, readiness and metrics: always open (no API key), so probes and scrapers need no secret."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import RuntimeDep
from ..schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process serves HTTP")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Loading, stopping or unhealthy."}},
    summary="Readiness: bundle verified, backend loaded, warm-up inference passed",
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    stuck = runtime.stuck() if runtime.ready else None
    ready = runtime.ready and stuck is None
    body = ReadyResponse(
        status="unhealthy" if stuck else runtime.status,
        model=runtime.bundle.model_id if runtime.bundle else None,
        backend=f"{runtime.backend.name} {runtime.backend.precision}" if runtime.backend and ready else None,
        detail=stuck or runtime.detail,
    )
    if ready:
        return JSONResponse(body.model_dump())
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
