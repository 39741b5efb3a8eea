"""POST /embed: pooled or per-patch embeddings, as JSON or .npy."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response

from ..deps import DeadlineDep, RuntimeDep, require_api_key
from ..fast import JSONResponse, array_for_json
from ..inputs import read_images
from ..postprocess import l2_normalize, npy_bytes, pool
from ..schemas import EmbedResponse, OutDType, Pooling
from .common import ERROR_RESPONSES, NPY, images_request_body, negotiate, preprocess_all

router = APIRouter(tags=["embed"], dependencies=[Depends(require_api_key)])


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses={
        **ERROR_RESPONSES,
        200: {
            "content": {NPY: {"schema": {"type": "string", "format": "binary"}}},
            "description": "JSON (default) or .npy with Accept: application/x-npy; "
            "the .npy carries X-Shape, X-Dtype, X-Patch-Grid, X-Model-Id headers.",
        },
    },
    openapi_extra=images_request_body(single=False),
    summary="Embed one or more images",
)
async def embed(
    request: Request,
    runtime: RuntimeDep,
    deadline: DeadlineDep,
    pooling: Annotated[
        Pooling,
        Query(
            description="cls token, mean of patch tokens, or none (every patch "
            "token, row-major, with the patch grid)."
        ),
    ] = Pooling.cls,
    normalize: Annotated[bool, Query(description="L2-normalize each vector.")] = False,
    dtype: Annotated[OutDType, Query(description="Output dtype.")] = OutDType.float32,
    accept: Annotated[str | None, Header(description=f"application/json (default) or {NPY}.")] = None,
) -> Response:
    as_npy = negotiate(accept, ("application/json", NPY)) == NPY  # 406 before any work
    batcher = runtime.batcher("embed")
    settings, bundle = runtime.settings, runtime.bundle
    assert bundle is not None
    with batcher.announce() as ticket:
        blobs = await read_images(request, settings.max_images_per_request)
        x = await preprocess_all(runtime, blobs, deadline)
        runtime.metrics.images.labels("embed").inc(len(blobs))
        tokens = await batcher.submit({"images": x}, deadline=deadline, ticket=ticket)
    out = pool(tokens, pooling.value)
    if normalize:
        out = l2_normalize(out)
    out = out.astype(np.float16 if dtype is OutDType.float16 else np.float32, copy=False)
    grid = list(bundle.image.grid) if pooling is Pooling.none else None
    if as_npy:
        headers = {
            "X-Shape": ",".join(map(str, out.shape)),
            "X-Dtype": out.dtype.name,
            "X-Model-Id": bundle.model_id,
        }
        if grid:
            headers["X-Patch-Grid"] = ",".join(map(str, grid))
        return Response(npy_bytes(out), media_type=NPY, headers=headers)
    return JSONResponse(
        {
            "model": bundle.model_id,
            "pooling": pooling.value,
            "normalized": normalize,
            "dtype": dtype.value,
            "shape": list(out.shape),
            "dim": int(out.shape[-1]),
            "patch_grid": grid,
            "embeddings": array_for_json(out),
        }
    )
