"""What the task routers share: the read -> decode -> submit prologue, work in the decode pool (decoding,
post-processing), content negotiation and the OpenAPI request bodies and error responses."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import Request

from ..batcher import MicroBatcher, Output
from ..errors import DeadlineExceeded, NotAcceptable
from ..fast import decode_inline
from ..imaging import Decoded
from ..inputs import read_images
from ..runtime import Runtime
from ..schemas import ErrorBody, ImagesJSON

NPY = "application/x-npy"
T = TypeVar("T")


async def in_pool(runtime: Runtime, deadline: float, what: str, calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run ``calls`` in the decode pool (off the event loop, in parallel) within the request deadline."""
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(runtime.decode_pool, c) for c in calls]
    try:
        return list(await asyncio.wait_for(asyncio.gather(*jobs), max(0.0, deadline - loop.time())))
    except TimeoutError:
        raise DeadlineExceeded(f"the request deadline passed while {what}") from None


async def decode_all(
    runtime: Runtime, blobs: list[bytes], deadline: float, task: str = "embed", keep_images: bool = False
) -> list[Decoded]:
    """Decode + preprocess every image with ``task``'s image spec, keeping the original sizes (and, with
    ``keep_images``, the decoded images)."""
    pre = runtime.preprocessor_for(task)
    hist = runtime.metrics.preprocess
    multi = len(blobs) > 1

    def work(data: bytes, i: int) -> Decoded:
        t0 = time.perf_counter()
        out = pre.process(data, f"image {i}" if multi else "image", keep_image=keep_images)
        hist.observe(time.perf_counter() - t0)
        return out

    if decode_inline(blobs):  # thumbnails: decoding costs less than the two pool hand-offs
        return [work(b, i) for i, b in enumerate(blobs)]
    return await in_pool(
        runtime, deadline, "decoding images", [functools.partial(work, b, i) for i, b in enumerate(blobs)]
    )


def stack(decoded: list[Decoded]) -> np.ndarray:
    return decoded[0].array[None] if len(decoded) == 1 else np.stack([d.array for d in decoded])


async def preprocess_all(
    runtime: Runtime, blobs: list[bytes], deadline: float, task: str = "embed"
) -> np.ndarray:
    """Decode + preprocess every image in the decode pool (off the event loop) -> [n, C, H, W]."""
    return stack(await decode_all(runtime, blobs, deadline, task))


async def off_loop(runtime: Runtime, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the decode pool: post-processing never runs on the event loop, which keeps serving
    other requests meanwhile (no deadline: the answer is computed, only its delivery is left)."""
    return await asyncio.get_running_loop().run_in_executor(runtime.decode_pool, functools.partial(fn, *args))


@dataclass(frozen=True)
class Submitted:
    """A request after the shared prologue: its image bytes, decoded images, the stacked batch and the
    batcher's output for it."""

    blobs: list[bytes]
    decoded: list[Decoded]
    images: np.ndarray  # [n, C, H, W], preprocessed
    output: Output
    decoded_at: float  # time.perf_counter() once decoded (the timing_ms split)


async def read_decode_submit(
    request: Request,
    runtime: Runtime,
    batcher: MicroBatcher,
    deadline: float,
    *,
    max_images: int,
    keep_images: bool = False,
    extra_inputs: dict[str, np.ndarray] | None = None,
    key: Hashable = None,
    check: Callable[[list[bytes]], None] | None = None,
) -> Submitted:
    """Every model route's prologue: announce to ``batcher`` (429 before the body is read when its queue is
    full), read the images, ``check`` them, decode + preprocess with the task's image spec, count them,
    and await the batch output (``extra_inputs`` join ``images``; ``key``: what requests must share to
    batch together)."""
    task = batcher.task
    with batcher.announce() as ticket:
        blobs = await read_images(request, max_images)
        if check is not None:
            check(blobs)
        decoded = await decode_all(runtime, blobs, deadline, task, keep_images=keep_images)
        runtime.metrics.images.labels(task).inc(len(blobs))
        decoded_at = time.perf_counter()
        x = stack(decoded)
        output = await batcher.submit(
            {"images": x, **(extra_inputs or {})}, key=key, deadline=deadline, ticket=ticket
        )
    return Submitted(blobs, decoded, x, output, decoded_at)


def timing(t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    """Milliseconds per stage from perf_counter marks: start, decoded, inferred, post-processed."""
    return {
        "decode_ms": round((t1 - t0) * 1e3, 3),
        "inference_ms": round((t2 - t1) * 1e3, 3),
        "postprocess_ms": round((t3 - t2) * 1e3, 3),
        "total_ms": round((t3 - t0) * 1e3, 3),
    }


def negotiate(accept: str | None, offers: tuple[str, ...]) -> str:
    """The offer the client prefers by its Accept header (q-values; exact beats type/* beats */*); no
    header and ties go to the first offer (the default); a header that accepts none of the offers is
    406 ``not_acceptable``."""
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
    if q <= 0:
        shown = accept if len(accept) <= 100 else accept[:100] + "..."
        raise NotAcceptable(
            f"Accept: {shown} matches nothing this route answers; accept {' or '.join(offers)}"
        )
    return offer


# A valid 32x32 PNG (an RGB gradient): the JSON body's example, so Swagger UI's "Try it out" and
# schema-driven tools (schemathesis' examples phase) send an image every route accepts.
EXAMPLE_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAALUlEQVR42u3NsQkAIBAAsRO++P0ndgntAulzqm3+mXbqI4FA"
    "IBAIBAKBQPDKBTt/Emp7UMZVAAAAAElFTkSuQmCC"
)


def images_request_body(single: bool) -> dict[str, Any]:
    """OpenAPI requestBody for the accepted input forms (the routes parse bodies themselves, to control
    limits and error messages)."""
    binary = {"type": "string", "format": "binary"}
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
                "application/json": {
                    "schema": ImagesJSON.openapi_schema(single),
                    "example": {"image": EXAMPLE_PNG_B64} if single else {"images": [EXAMPLE_PNG_B64]},
                },
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
        406: "The Accept header asks for a type that cannot hold this answer.",
        413: "A limit: body bytes, images per request, pixels per image.",
        415: "Content type or image format not accepted.",
        422: "Invalid option value, image too small, bad mask.",
        429: "Queue full; see Retry-After.",
        501: "The bundle has the task but the loaded backend cannot run it (the message says why).",
        503: "Not ready (loading, shutting down, unhealthy).",
        504: "Request deadline exceeded.",
    }.items()
}
