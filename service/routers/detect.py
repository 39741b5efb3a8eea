"""POST /detect: object detections (box, class, score, optional instance mask) in original image pixels.

The detect graph is fixed to one image per call (its outputs have no batch axis), so its batcher feeds
it one image at a time; a request with several images still goes through one queue entry. Box scaling,
mask resizing and the RLE format are described in ``service/dense.py``.
"""

from __future__ import annotations

import functools
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response

from .. import dense
from ..deps import DeadlineDep, RuntimeDep, require_api_key
from ..fast import JSONResponse
from ..imaging import Decoded
from ..schemas import DetectResponse, MaskFormat
from .common import ERROR_RESPONSES, images_request_body, in_pool, negotiate, read_decode_submit, timing

router = APIRouter(tags=["detect"], dependencies=[Depends(require_api_key)])

TASK = "detect"
DEFAULT_SCORE_THRESHOLD = 0.5
MAX_DETECTIONS_LIMIT = 1000


def detect_one(
    outs: dict[str, np.ndarray],
    d: Decoded,
    classes: list[str],
    input_size: int,
    score_threshold: float,
    max_detections: int,
    masks: MaskFormat,
    nms_iou: float | None = None,
) -> dict[str, Any]:
    w, h = d.size
    keep = dense.select_detections(outs["scores"], score_threshold, max_detections, outs["boxes"], nms_iou)
    boxes = dense.scale_boxes(outs["boxes"][keep], input_size, w, h)
    labels = outs["labels"].reshape(-1)[keep].astype(np.int64)
    scores = outs["scores"].reshape(-1)[keep]
    detections = []
    for j, i in enumerate(keep):
        label = int(labels[j])
        det: dict[str, Any] = {
            "box": boxes[j].tolist(),
            "label": label,
            "label_name": classes[label] if 0 <= label < len(classes) else f"class_{label}",
            "score": float(scores[j]),
            "mask": None,
        }
        if masks is not MaskFormat.none:
            # only the window the mask can cover is resized (dense.mask_window): exact, and independent
            # of the image size for small objects
            y0, x0, crop = dense.mask_window(outs["masks"][i], h, w)
            if masks is MaskFormat.rle:
                det["mask"] = dense.rle_window(h, w, y0, x0, crop)
            else:
                det["mask"] = dense.b64(dense.mask_png(h, w, y0, x0, crop))
        detections.append(det)
    return {"width": w, "height": h, "detections": detections}


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=images_request_body(single=False),
    summary="Object detection: boxes, classes, scores and optional instance masks, in original pixels",
)
async def detect(
    request: Request,
    runtime: RuntimeDep,
    deadline: DeadlineDep,
    score_threshold: Annotated[
        float | None,
        Query(
            ge=0, le=1, description="Keep detections scoring at least this (default: the model's, or 0.5)."
        ),
    ] = None,
    max_detections: Annotated[
        int, Query(ge=1, le=MAX_DETECTIONS_LIMIT, description="Most detections per image, best first.")
    ] = 100,
    masks: Annotated[
        MaskFormat,
        Query(description="Instance masks at the original size: none, COCO uncompressed RLE, or base64 PNG."),
    ] = MaskFormat.none,
    accept: Annotated[str | None, Header(description="application/json (the only answer).")] = None,
) -> Response:
    t0 = time.perf_counter()
    negotiate(accept, ("application/json",))  # 406 before any work
    batcher = runtime.batcher(TASK)
    bundle = runtime.bundle
    assert bundle is not None
    classes = bundle.classes(TASK)
    if score_threshold is None:
        score_threshold = float(bundle.spec["tasks"][TASK].get("score_threshold", DEFAULT_SCORE_THRESHOLD))
    # one {output name: array} per image (the batcher runs the graph on one image at a time)
    sub = await read_decode_submit(
        request, runtime, batcher, deadline, max_images=runtime.settings.max_images_per_request
    )
    decoded, outputs, t1 = sub.decoded, sub.output, sub.decoded_at
    t2 = time.perf_counter()
    size = bundle.image_for(TASK).size
    nms_iou = bundle.spec["tasks"][TASK].get(
        "nms_iou_threshold"
    )  # class-agnostic NMS; absent: off (older bundles)
    calls = [
        functools.partial(
            detect_one,
            o,
            d,
            classes,
            size,
            score_threshold,
            max_detections,
            masks,
            None if nms_iou is None else float(nms_iou),
        )
        for o, d in zip(outputs, decoded, strict=True)
    ]
    results = await in_pool(runtime, deadline, "post-processing", calls)
    body = {
        "model": bundle.model_id,
        "classes": classes,
        "input_size": [size, size],
        "score_threshold": score_threshold,
        "max_detections": max_detections,
        "masks": masks.value,
        "mask_threshold": dense.MASK_THRESHOLD,
        "results": results,
        "timing_ms": timing(t0, t1, t2, time.perf_counter()),
    }
    return JSONResponse(body, headers={"X-Model-Id": bundle.model_id})
