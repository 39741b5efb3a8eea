"""Helpers shared by the task routers: decoding in the worker pool, content negotiation, OpenAPI bodies."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from ..errors import DeadlineExceeded
from ..runtime import Runtime
from ..schemas import ErrorBody, ImageJSONBody, ImagesJSONBody

NPY = "application/x-npy"


async def preprocess_all(runtime: Runtime, blobs: list[bytes], deadline: float) -> np.ndarray:
    """Decode + preprocess every image in the decode pool (off the event loop) -> [n, C, H, W]."""
    pre = runtime.preprocessor
    assert pre is not None
    hist = runtime.metrics.preprocess
    multi = len(blobs) > 1

    def work(data: bytes, i: int) -> np.ndarray:
        t0 = time.perf_counter()
        out = pre(data, f"image {i}" if multi else "image")
        hist.observe(time.perf_counter() - t0)
        return out

    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(runtime.decode_pool, work, b, i) for i, b in enumerate(blobs)]
    try:
        arrays = await asyncio.wait_for(asyncio.gather(*jobs), max(0.0, deadline - loop.time()))
    except TimeoutError:
        raise DeadlineExceeded("the request deadline passed while decoding images") from None
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


def negotiate(accept: str | None, offers: tuple[str, ...]) -> str:
    """The offer the client prefers by its Accept header (q-values; exact beats type/* beats */*);
    ties and unacceptable headers go to the first offer (the default)."""
    if not accept:
        return offers[0]
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        media, *params = (x.strip() for x in part.split(";"))
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        ranges.append((media.lower(), q))

    def quality(offer: str) -> float:
        best, specificity = 0.0, -1
        for media, q in ranges:
            if media == offer:
                s = 2
            elif media.endswith("/*") and offer.startswith(media[:-1]):
                s = 1
            elif media == "*/*":
                s = 0
            else:
                continue
            if s > specificity:
                best, specificity = q, s
        return best

    scored = [(quality(o), -i, o) for i, o in enumerate(offers)]
    q, _, offer = max(scored)
    return offer if q > 0 else offers[0]


def images_request_body(single: bool) -> dict[str, Any]:
    """OpenAPI requestBody for the accepted input forms (the routes parse bodies themselves, to control
    limits and error messages)."""
    binary = {"type": "string", "format": "binary"}
    json_model = ImageJSONBody if single else ImagesJSONBody
    multipart: dict[str, Any] = {"type": "object", "properties": {"file": binary}}
    if not single:
        multipart["properties"]["files"] = {"type": "array", "items": binary}
    return {
        "requestBody": {
            "required": True,
            "description": "An image as a multipart part `file`"
            + ("" if single else " (or several as `files`)")
            + ", as base64 in JSON, or as the raw body with Content-Type image/* "
            "(JPEG, PNG, WebP, GIF first frame, BMP, TIFF).",
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": json_model.model_json_schema()},
                "image/*": {"schema": binary},
            },
        }
    }


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": desc}
    for code, desc in {
        400: "Malformed input (empty body, corrupt image, bad base64 or JSON).",
        401: "Missing or wrong API key (when keys are configured).",
        404: "The loaded model has no such task or id.",
        413: "A limit: body bytes, images per request, pixels per image.",
        415: "Content type or image format not accepted.",
        422: "Invalid option value, image too small, bad mask.",
        429: "Queue full; see Retry-After.",
        503: "Not ready (loading, shutting down, unhealthy).",
        504: "Request deadline exceeded.",
    }.items()
}
