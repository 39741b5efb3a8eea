"""Hostile input against the whole app (issue 8): every answer is a documented 4xx or a 200, never a 5xx or
a hang, and the server keeps serving afterwards.

Covers /embed, /reconstruct, /segment and /detect on the dense test bundle (tests/test_service_dense.py):
a corpus of awkward but valid images (exact expectations), decompression bombs and non-images with image
names, Hypothesis mutations (truncation, bit flips, splices) of JPEG/PNG/WebP/GIF/TIFF/BMP in every input
form, arbitrary request bodies and content types, and a bounded schemathesis run over the OpenAPI schema
(in-process ASGI, fixed seed). tests/test_service_imaging.py fuzzes the decoder alone; this goes through
HTTP parsing, admission, decoding, batching and post-processing.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import (
    encode,
    huge_canvas_png,
    image_array,
    serve,
)

pytestmark = pytest.mark.timeout(300)  # a hang fails the test instead of stalling the suite

ROUTES = ("/embed", "/reconstruct", "/segment", "/detect")
# the documented client errors (docs/serving.md, "Limits and errors"); a 200 is fine too
DOCUMENTED = {
    400: {"empty_body", "corrupt_image", "bad_base64", "bad_json", "bad_multipart", "bad_request"},
    404: {"not_found", "model_not_found", "task_not_available"},
    405: {"method_not_allowed"},
    406: {"not_acceptable"},
    413: {"body_too_large", "too_many_images", "too_many_pixels"},
    415: {"unsupported_media_type", "unsupported_format", "unsupported_mode"},
    422: {"invalid_option", "invalid_json", "image_too_small", "invalid_mask", "needs_pixel_target"},
}
LIMITS = {
    "max_images_per_request": 3,
    "max_body_bytes": 300_000,
    "max_pixels": 1_000_000,
    "min_side": 16,
    "request_timeout_s": 20,
}
HYPO = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def client(dense_bundle: Path) -> Iterator[Any]:
    with serve(dense_bundle, **LIMITS) as c:
        yield c


# ------------------------------------------------------------------------------------------- images
def _rgb(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(image_array(w, h, seed))


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return encode(_rgb(48, 20), "JPEG", exif=exif.tobytes())


def _palette_transparent() -> bytes:
    p = _rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(p, "PNG", transparency=0)


def _multipage_tiff() -> bytes:
    return encode(_rgb(), "TIFF", save_all=True, append_images=[_rgb(seed=1), _rgb(seed=2)])


SEEDS: dict[str, bytes] = {
    "jpeg": encode(_rgb(), "JPEG", quality=80),
    "png": encode(_rgb(), "PNG"),
    "webp": encode(_rgb(), "WEBP"),
    "gif": encode(_rgb().convert("P"), "GIF"),
    "tiff": encode(_rgb(), "TIFF"),
    "bmp": encode(_rgb(), "BMP"),
    "png16": encode(Image.fromarray(image_array()[..., 0].astype(np.uint16) * 257), "PNG"),
    "cmyk_jpeg": encode(_rgb().convert("CMYK"), "JPEG"),
    "palette_alpha": _palette_transparent(),
    "anim_gif": _animated("GIF"),
    "anim_webp": _animated("WEBP"),
    "exif_rotated": _exif_rotated(),
    "tiff_multipage": _multipage_tiff(),
}

# awkward but valid: every route answers 200
VALID = {
    **SEEDS,
    "rgba_png": encode(_rgb().convert("RGBA"), "PNG"),
    "la_png": encode(_rgb().convert("LA"), "PNG"),
    "one_bit_png": encode(_rgb().convert("1"), "PNG"),
    "tiff16": encode(Image.fromarray(image_array()[..., 1].astype(np.uint16) * 200), "TIFF"),
    "float_tiff": encode(Image.fromarray(image_array()[..., 2].astype(np.float32) / 255), "TIFF"),
    "ycbcr_jpeg_grey": encode(_rgb().convert("L"), "JPEG"),
    "min_side_16": encode(_rgb(16, 16), "PNG"),
    "at_pixel_limit": encode(Image.new("L", (1000, 1000), 7), "PNG"),  # 1e6 px = the limit, ~1 kB
}


def _gif_screen(w: int, h: int) -> bytes:
    """A valid 40x30 GIF whose logical screen declares w x h."""
    data = bytearray(SEEDS["gif"])
    data[6:10] = struct.pack("<HH", w, h)
    return bytes(data)


def _jpeg_sof(w: int, h: int) -> bytes:
    """A valid JPEG whose frame header (SOF0) declares w x h."""
    data = bytearray(SEEDS["jpeg"])
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _tiff_header(w: int, h: int) -> bytes:
    """A minimal little-endian greyscale TIFF declaring w x h with one tiny strip."""
    entries = [
        (256, 4, 1, w),  # ImageWidth
        (257, 4, 1, h),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: black is zero
        (273, 4, 1, 8),  # StripOffsets
        (278, 4, 1, h),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
    ]
    ifd_offset = 8 + 16
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<H", value) + b"\0\0" if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    return b"II*\x00" + struct.pack("<I", ifd_offset) + b"\0" * 16 + ifd + b"\0\0\0\0"


def _webp_canvas(w: int, h: int) -> bytes:
    """An extended WebP (VP8X) whose canvas declares w x h around a small VP8L image."""
    inner = encode(_rgb(), "WEBP", lossless=True)[12:]  # the VP8L chunk
    vp8x = (
        b"VP8X"
        + struct.pack("<I", 10)
        + b"\0\0\0\0"
        + (w - 1).to_bytes(3, "little")
        + (h - 1).to_bytes(3, "little")
    )
    body = b"WEBP" + vp8x + inner
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _zlib_bomb_png(side: int = 4000) -> bytes:
    """A real PNG of side x side zeros: a few kB that would inflate to side^2 bytes."""
    return encode(Image.new("L", (side, side), 0), "PNG", optimize=True)


# (name, bytes, expected status, expected code): the same answer on every route
REJECTED: list[tuple[str, bytes, int, str]] = [
    ("zero_length", b"", 400, "empty_body"),
    ("one_by_one", encode(_rgb(1, 1), "PNG"), 422, "image_too_small"),
    ("one_by_n", encode(_rgb(1, 64), "PNG"), 422, "image_too_small"),
    ("n_by_one_gif", encode(_rgb(64, 1).convert("P"), "GIF"), 422, "image_too_small"),
    ("bomb_png_canvas", huge_canvas_png(), 413, "too_many_pixels"),
    ("bomb_png_zlib", _zlib_bomb_png(), 413, "too_many_pixels"),
    ("bomb_gif_screen", _gif_screen(65535, 65535), 413, "too_many_pixels"),
    ("bomb_jpeg_sof", _jpeg_sof(65000, 65000), 413, "too_many_pixels"),
    ("bomb_tiff", _tiff_header(100_000, 100_000), 413, "too_many_pixels"),
    ("bomb_webp_canvas", _webp_canvas(16384, 16384), 413, "too_many_pixels"),
    ("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415, "unsupported_format"),
    ("zip", b"PK\x03\x04" + b"\0" * 40, 415, "unsupported_format"),
    ("elf", b"\x7fELF\x02\x01\x01" + b"\0" * 57, 415, "unsupported_format"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="30"/>', 415, "unsupported_format"),
    ("html", b"<!doctype html><img src=x onerror=alert(1)>", 415, "unsupported_format"),
    ("pickle", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94.", 415, "unsupported_format"),
    ("npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}", 415, "unsupported_format"),
    ("ppm", encode(_rgb(), "PPM"), 415, "unsupported_format"),
    ("ico", encode(_rgb(32, 32), "ICO"), 415, "unsupported_format"),
    ("jpeg_magic_then_text", b"\xff\xd8\xff" + b"this is not a jpeg" * 8, 400, "corrupt_image"),
    ("png_header_only", SEEDS["png"][:33], 400, "corrupt_image"),
]


# ------------------------------------------------------------------------------------------ helpers
def _request(client: Any, route: str, data: bytes, form: str, name: str = "cat.png") -> Any:
    """POST ``data`` to ``route`` as a raw body, a multipart part named like an image, or JSON base64."""
    if form == "raw":
        return client.post(route, content=data, headers={"content-type": "image/png"})
    if form == "multipart":
        return client.post(route, files={"file": (name, data, "image/jpeg")})
    key = "image" if route == "/reconstruct" else "images"
    b64 = base64.b64encode(data).decode()
    return client.post(route, json={key: b64 if key == "image" else [b64]})


def assert_documented(r: Any, allow: tuple[int, ...] = (200, 400, 406, 413, 415, 422)) -> None:
    assert r.status_code in allow, (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["code"] in DOCUMENTED[r.status_code], err
        assert isinstance(err["message"], str) and err["message"]


def assert_still_serving(client: Any) -> None:
    good = SEEDS["png"]
    for route in ROUTES:
        r = client.post(route, content=good, headers={"content-type": "image/png"})
        assert r.status_code == 200, (route, r.text[:300])
    assert client.get("/readyz").status_code == 200


# ------------------------------------------------------------------------------------------- corpus
@pytest.mark.parametrize("name", sorted(VALID))
def test_awkward_valid_images_are_served_on_every_route(client: Any, name: str) -> None:
    for route in ROUTES:
        r = _request(client, route, VALID[name], "raw")
        assert r.status_code == 200, (route, name, r.text[:300])


def test_awkward_images_in_every_form(client: Any) -> None:
    for name in ("anim_webp", "palette_alpha", "exif_rotated", "png16"):
        for form in ("multipart", "json"):
            r = _request(client, "/embed", VALID[name], form)
            assert r.status_code == 200, (name, form, r.text[:300])


def test_exif_rotation_reaches_the_dense_heads(client: Any) -> None:
    r = client.post(
        "/segment?format=json", content=SEEDS["exif_rotated"], headers={"content-type": "image/png"}
    )
    labels = r.json()["results"][0]["labels"]
    assert (len(labels), len(labels[0])) == (48, 20)  # 48x20 stored, shown upright as 20 wide, 48 high


@pytest.mark.parametrize(("name", "data", "status", "code"), REJECTED, ids=[c[0] for c in REJECTED])
def test_hostile_files_get_their_documented_error_on_every_route(
    client: Any, name: str, data: bytes, status: int, code: str
) -> None:
    for route in ROUTES:
        for form in ("raw", "multipart"):
            r = _request(client, route, data, form, name="holiday.jpg")
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (route, form, r.text[:300])


# --------------------------------------------------------------------------------------- hypothesis
@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    kind = draw(st.sampled_from(("truncate", "flip", "splice", "flip_header")))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind in ("flip", "flip_header"):
        hi = min(len(data), 64) if kind == "flip_header" else len(data)
        for pos, bit in draw(
            st.lists(st.tuples(st.integers(0, hi - 1), st.integers(0, 7)), min_size=1, max_size=8)
        ):
            data[pos] ^= 1 << bit
        return bytes(data)
    at = draw(st.integers(0, len(data)))
    cut = draw(st.integers(0, 32))
    return bytes(data[:at]) + draw(st.binary(max_size=64)) + bytes(data[at + cut :])


@HYPO
@given(data=mutated(), route=st.sampled_from(ROUTES), form=st.sampled_from(("raw", "multipart", "json")))
def test_mutated_images_never_give_a_server_error(client: Any, data: bytes, route: str, form: str) -> None:
    assert_documented(_request(client, route, data, form))


CONTENT_TYPES = (
    "image/png",
    "application/octet-stream",
    "application/json",
    "multipart/form-data; boundary=xyz",
    "multipart/form-data",
    "text/plain",
    "",
    "image/png; charset=utf-8",
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["images", "image", "x"]), inner, max_size=3)
    ),
    max_leaves=10,
)


@HYPO
@given(
    route=st.sampled_from(ROUTES),
    content_type=st.sampled_from(CONTENT_TYPES),
    body=st.one_of(
        st.binary(max_size=512),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda s: (
                b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
                + s
                + b"\r\n--xyz--\r\n"
            ),
            st.binary(max_size=200),
        ),
    ),
    query=st.sampled_from(
        (
            "",
            "?pooling=none&dtype=float16",
            "?mask_ratio=0.0001",
            "?masked=0,15",
            "?format=json&overlay=true",
            "?overlay_alpha=nan",
            "?max_detections=0",
            "?score_threshold=inf",
            "?seed=-1",
            "?masks=png",
            "?%ff=%00",
        )
    ),
)
def test_arbitrary_bodies_never_give_a_server_error(
    client: Any, route: str, content_type: str, body: bytes, query: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(route + query, content=body, headers=headers)
    assert_documented(r)


def test_the_server_still_serves_after_all_of_the_above(client: Any) -> None:
    # same module-scoped app as every test above (pytest runs them in file order)
    assert_still_serving(client)
    assert client.get("/metrics").status_code == 200


# -------------------------------------------------------------------------------------- schemathesis
schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def api_schema(dense_bundle: Path) -> Iterator[Any]:
    """The app's own OpenAPI schema, called in-process (ASGI): nothing leaves the process."""
    from service.app import create_app
    from service.settings import Settings

    pixels = Image.MAX_IMAGE_PIXELS
    app = create_app(
        Settings(model_dir=dense_bundle, backend="onnxruntime", precision="fp32", decode_workers=2, **LIMITS)
    )
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        Image.MAX_IMAGE_PIXELS = pixels


def test_openapi_schemathesis(api_schema: Any) -> None:
    """A bounded schemathesis run over every operation of the app's OpenAPI schema: a few generated cases
    each (fixed seed), no 5xx, and every response conforms to the schema (status, content type, body).
    Driven through Hypothesis directly: schemathesis' pytest plugin does not load with this pytest."""
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
    ran: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=10,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call()
            # no 5xx at all: X-Request-Timeout is bounded in the schema (a tiny deadline is a 422)
            assert response.status_code < 500, (
                case.method,
                case.path,
                response.status_code,
                response.text[:300],
            )
            case.validate_response(response, checks=checks)

        check()
        ran.append(f"{operation.method.upper()} {operation.path}")
    assert {"POST /embed", "POST /reconstruct", "POST /segment", "POST /detect", "GET /v1/models"} <= set(
        ran
    ), ran
