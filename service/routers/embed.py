"""POST /embed: pooled or per-patch embeddings, as JSON or .npy."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response

from ..batcher import Output
from ..bundle import Bundle
from ..deps import DeadlineDep, RuntimeDep, require_api_key
from ..errors import Unprocessable
from ..fast import JSONResponse, array_for_json
from ..postprocess import l2_normalize, npy_bytes, pool
from ..schemas import POOLING_PATTERN, EmbedResponse, OutDType
from .common import ERROR_RESPONSES, NPY, images_request_body, negotiate, off_loop, read_decode_submit

router = APIRouter(tags=["embed"], dependencies=[Depends(require_api_key)])


def respond(
    bundle: Bundle, result: Output, pooling: str, normalize: bool, dtype: OutDType, as_npy: bool
) -> Response:
    """The batch output as the requested readout (pooled, optionally L2-normalized, in ``dtype``), encoded
    as .npy or JSON: all of it in the decode pool, since ``pooling=none`` bodies are large."""
    if isinstance(result, list):  # a graph with block readouts: one {output: array} per image
        tokens = np.stack([r["tokens"] for r in result])
        blocks = np.stack([r["block_readouts"] for r in result]) if "block_readouts" in result[0] else None
    else:
        tokens, blocks = result, None
    out = pool(tokens, pooling, blocks)
    if normalize:
        out = l2_normalize(out)
    out = out.astype(np.float16 if dtype is OutDType.float16 else np.float32, copy=False)
    grid = list(bundle.image.grid) if pooling == "none" else None
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
            "pooling": pooling,
            "normalized": normalize,
            "dtype": dtype.value,
            "shape": list(out.shape),
            "dim": int(out.shape[-1]),
            "patch_grid": grid,
            "embeddings": array_for_json(out),
        }
    )


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
        str | None,
        Query(
            pattern=POOLING_PATTERN,
            description="cls token, mean of the patch tokens, cls+mean (both concatenated), lastN "
            "(DINOv2-style: cls and patch mean of each of the last N blocks, e.g. last4), or none "
            "(every patch token, row-major, "
            "with the patch grid). Default: the bundle's default_pooling (GET /v1/models), the readout its "
            "model card measured.",
        ),
    ] = None,
    normalize: Annotated[bool, Query(description="L2-normalize each vector.")] = False,
    dtype: Annotated[OutDType, Query(description="Output dtype.")] = OutDType.float32,
    accept: Annotated[str | None, Header(description=f"application/json (default) or {NPY}.")] = None,
) -> Response:
    as_npy = negotiate(accept, ("application/json", NPY)) == NPY  # 406 before any work
    batcher = runtime.batcher("embed")
    settings, bundle = runtime.settings, runtime.bundle
    assert bundle is not None
    pooling = (pooling or bundle.default_pooling).replace(" ", "+")
    if pooling not in bundle.poolings:
        raise Unprocessable(
            f"pooling {pooling!r} is not offered by this model; choose one of {', '.join(bundle.poolings)}",
            code="invalid_option",
        )
    sub = await read_decode_submit(
        request, runtime, batcher, deadline, max_images=settings.max_images_per_request
    )
    return await off_loop(runtime, respond, bundle, sub.output, pooling, normalize, dtype, as_npy)
