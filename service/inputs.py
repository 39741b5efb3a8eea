"""Getting image bytes out of a request: multipart, JSON base64, or a raw ``image/*`` body.

Only bytes the client sent are accepted: there is no URL fetching (a server that fetches client URLs is
an SSRF and DoS channel). Counts are checked before any base64 decoding or image decoding.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from . import fast
from .errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from .schemas import ImagesJSON

ACCEPTED_CONTENT_TYPES = ("multipart/form-data", "application/json", "image/*", "application/octet-stream")
FILE_FIELDS = ("file", "files")


def _too_many(n: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{n} images in one request; the limit is {limit}", code="too_many_images", limit=limit
    )


def decode_base64(s: str, label: str) -> bytes:
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(
                f"{label}: a data URI must be base64-encoded (data:image/...;base64,...)", code="bad_base64"
            )
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{label}: not valid base64", code="bad_base64") from None


def _query_names(request: Request) -> set[str]:
    """The query parameters the matched route declares (to point a misplaced form field at the URL)."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    return {p.alias for p in getattr(dependant, "query_params", ())}


async def _read_multipart(request: Request, max_images: int) -> list[bytes]:
    parser = MultiPartParser(request.headers, request.stream(), max_files=max_images, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):
            raise _too_many(max_images + 1, max_images) from None
        raise BadRequest("malformed multipart body", code="bad_multipart") from None
    try:
        blobs: list[bytes] = []
        for name, value in form.multi_items():
            if name not in FILE_FIELDS:
                hint = "send images as 'file' or 'files' parts"
                if name in _query_names(request):
                    hint = (
                        f"{name!r} is a query parameter: put it in the URL ({request.url.path}?{name}=...); "
                        + hint
                    )
                raise BadRequest(f"unexpected multipart field {name!r}; {hint}", code="bad_multipart")
            if not isinstance(value, UploadFile):
                raise BadRequest(f"multipart field {name!r} must be a file part", code="bad_multipart")
            blobs.append(await value.read())
        if not blobs:
            raise BadRequest("multipart body without a 'file' or 'files' part", code="empty_body")
        return blobs
    finally:
        await form.close()


def _well_formed(doc: Any) -> bool:
    """``{"images": [str, ...]}`` or ``{"image": str}`` exactly."""
    if not isinstance(doc, dict) or len(doc) != 1:
        return False
    if "images" in doc:
        items = doc["images"]
        return isinstance(items, list) and all(type(x) is str for x in items)
    return type(doc.get("image")) is str


def _parse_json(body: bytes, max_images: int) -> list[bytes]:
    try:
        doc: Any = fast.loads(body)  # orjson.JSONDecodeError is a json.JSONDecodeError
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("body is not valid JSON", code="bad_json") from None
    try:
        # the well-formed shapes skip model validation (the hot path); others get its error message
        req = ImagesJSON.model_construct(**doc) if _well_formed(doc) else ImagesJSON.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise Unprocessable(
            f'JSON {where}: {first["msg"]}; expected {{"images": ["<base64>", ...]}}', code="invalid_json"
        ) from None
    if (req.images is None) == (req.image is None):
        raise Unprocessable(
            'JSON body needs exactly one of "images" (a list) or "image"', code="invalid_json"
        )
    if req.images is None:  # {"image": ...}: errors name the key the client sent
        return [decode_base64(req.image or "", "image")]
    items = req.images
    if not items:
        raise BadRequest('"images" is empty', code="empty_body")
    if len(items) > max_images:
        raise _too_many(len(items), max_images)
    return [decode_base64(s, f"images[{i}]") for i, s in enumerate(items)]


async def read_images(request: Request, max_images: int) -> list[bytes]:
    """The image byte strings of a request (not yet decoded), at most ``max_images`` of them."""
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime == "multipart/form-data":
        blobs = await _read_multipart(request, max_images)
    elif mime == "application/json":
        blobs = _parse_json(await request.body(), max_images)
    elif mime.startswith("image/") or mime == "application/octet-stream":
        body = await request.body()
        blobs = [body] if body else []
    elif not mime:
        if await request.body():
            raise UnsupportedMediaType(
                "missing Content-Type; send " + ", ".join(ACCEPTED_CONTENT_TYPES),
                code="unsupported_media_type",
            )
        blobs = []
    else:
        raise UnsupportedMediaType(
            f"Content-Type {mime} not accepted; send " + ", ".join(ACCEPTED_CONTENT_TYPES),
            code="unsupported_media_type",
        )
    if not blobs or not all(blobs):
        raise BadRequest("empty body or empty image; send an image", code="empty_body")
    if len(blobs) > max_images:
        raise _too_many(len(blobs), max_images)
    return blobs
