"""POST /segment: a per-pixel class map of each image, at the image's original size.

The label map is the argmax of the logits resized bilinearly to the original size (see
``service/dense.py`` for why and how). JSON by default (the map as a base64 PNG of class ids, or as
nested lists with ``format=json``); one image may be answered as the raw PNG with ``Accept: image/png``.
"""

from __future__ import annotations

import functools
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response

from .. import dense
from ..deps import DeadlineDep, RuntimeDep, require_api_key
from ..errors import NotAcceptable
from ..fast import JSONResponse, array_for_json
from ..imaging import Decoded, sniff_format
from ..schemas import LabelFormat, SegmentResponse
from .common import ERROR_RESPONSES, images_request_body, in_pool, negotiate, read_decode_submit, timing

router = APIRouter(tags=["segment"], dependencies=[Depends(require_api_key)])

TASK = "segment"
OverlayFormat = Literal["auto", "png", "jpeg"]
RESIZE_RULE = "logits resized bilinearly (half-pixel centres) to the original size, then argmax"


def segment_one(
    logits: np.ndarray,
    d: Decoded,
    classes: list[str],
    fmt: LabelFormat | None,
    alpha: float | None,
    overlay_format: str = "png",
) -> dict[str, Any]:
    """One image's result; ``fmt`` None: the raw PNG bytes only (``label_png``)."""
    w, h = d.size
    labels = dense.label_map(logits, h, w)
    if fmt is None:
        return {"label_png": dense.png_bytes(labels)}
    out: dict[str, Any] = {
        "width": w,
        "height": h,
        "label_map": dense.b64(dense.png_bytes(labels)) if fmt is LabelFormat.png else None,
        "labels": array_for_json(labels) if fmt is LabelFormat.json else None,
        "class_pixels": dense.class_pixels(labels, classes),
        "overlay": None,
    }
    if alpha is not None and d.image is not None:
        image = dense.overlay_image(d.image, labels, len(classes), alpha)
        out["overlay"] = dense.b64(dense.encode_image(image, overlay_format))
        out["overlay_format"] = overlay_format
        d.image.close()
    return out


@router.post(
    "/segment",
    response_model=SegmentResponse,
    responses={
        **ERROR_RESPONSES,
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "JSON (default); with Accept: image/png and one image, the label map as a PNG "
            "whose pixel values are class ids (headers X-Model-Id, X-Image-Size, X-Num-Classes).",
        },
    },
    openapi_extra=images_request_body(single=False),
    summary="Semantic segmentation: a class id per pixel, at the original image size",
)
async def segment(
    request: Request,
    runtime: RuntimeDep,
    deadline: DeadlineDep,
    format: Annotated[
        LabelFormat,
        Query(description="Label map as a base64 PNG of class ids (png) or as nested lists (json)."),
    ] = LabelFormat.png,
    overlay: Annotated[
        bool, Query(description="Add a PNG of the class colours blended on the image.")
    ] = False,
    overlay_alpha: Annotated[
        float, Query(gt=0, le=1, description="Opacity of the class colours in the overlay.")
    ] = 0.5,
    overlay_format: Annotated[
        OverlayFormat,
        Query(
            description="Encoding of the overlay: auto = JPEG for a JPEG input (a photo's PNG costs ~10x "
            "the time and size), PNG otherwise; or png / jpeg."
        ),
    ] = "auto",
    accept: Annotated[
        str | None, Header(description="application/json (default), or image/png for one image.")
    ] = None,
) -> Response:
    t0 = time.perf_counter()
    raw_png = negotiate(accept, ("application/json", "image/png")) == "image/png"  # 406 before any work
    batcher = runtime.batcher(TASK)
    bundle = runtime.bundle
    assert bundle is not None
    classes = bundle.classes(TASK)

    def one_map_per_png(blobs: list[bytes]) -> None:
        if raw_png and len(blobs) > 1:
            raise NotAcceptable(
                f"an image/png answer holds one label map; {len(blobs)} images sent "
                "(send one, or accept application/json)",
                limit=1,
            )

    sub = await read_decode_submit(
        request, runtime, batcher, deadline, max_images=runtime.settings.max_images_per_request,
        keep_images=overlay and not raw_png, check=one_map_per_png,
    )  # fmt: skip
    blobs, decoded, logits, t1 = sub.blobs, sub.decoded, sub.output, sub.decoded_at
    t2 = time.perf_counter()
    fmt = None if raw_png else format
    alpha = overlay_alpha if overlay else None
    formats = [
        overlay_format if overlay_format != "auto" else ("jpeg" if sniff_format(b) == "JPEG" else "png")
        for b in blobs
    ]
    calls = [
        functools.partial(segment_one, logits[i], d, classes, fmt, alpha, formats[i])
        for i, d in enumerate(decoded)
    ]
    results = await in_pool(runtime, deadline, "post-processing", calls)
    t3 = time.perf_counter()
    size = bundle.image_for(TASK).size
    headers = {"X-Model-Id": bundle.model_id}
    if raw_png:
        w, h = decoded[0].size
        headers.update({"X-Image-Size": f"{w},{h}", "X-Num-Classes": str(len(classes))})
        return Response(results[0]["label_png"], media_type="image/png", headers=headers)
    body = {
        "model": bundle.model_id,
        "classes": classes,
        "input_size": [size, size],
        "format": format.value,
        "resize": RESIZE_RULE,
        "palette": dense.palette(len(classes)).tolist() if overlay else None,
        "results": results,
        "timing_ms": timing(t0, t1, t2, t3),
    }
    return JSONResponse(body, headers=headers)
