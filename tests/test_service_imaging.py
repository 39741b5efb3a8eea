"""Decoding untrusted images: formats, modes, orientation, limits checked before decoding, normalization."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.bundle import ImageSpec
from service.errors import BadRequest, PayloadTooLarge, ServiceError, Unprocessable, UnsupportedMediaType
from service.imaging import ALLOWED_FORMATS, Limits, Preprocessor, configure_pillow, sniff_format, to_mode
from tests.helpers import encode, huge_canvas_png, image_array

SPEC = ImageSpec(
    size=32,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    interpolation="bicubic",
    patch_size=8,
    grid=(4, 4),
    num_patches=16,
    channels=3,
)


@pytest.fixture
def pre() -> Iterator[Preprocessor]:
    pixels = Image.MAX_IMAGE_PIXELS
    configure_pillow(1_000_000)
    yield Preprocessor(SPEC, Limits(max_pixels=1_000_000, min_side=16))
    Image.MAX_IMAGE_PIXELS = pixels  # process-wide: leave other tests Pillow's default


def rgb_of(pre: Preprocessor, data: bytes) -> np.ndarray:
    return np.asarray(pre.decode(data))


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes(pre: Preprocessor, fmt: str) -> None:
    arr = image_array(40, 30)
    data = encode(Image.fromarray(arr), fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    assert sniff_format(data) == fmt
    out = rgb_of(pre, data)
    assert out.shape == (30, 40, 3)
    tol = {"JPEG": 12, "WEBP": 12, "GIF": 40}.get(fmt, 0)  # lossy / palette formats
    assert np.abs(out.astype(int) - arr).mean() <= tol
    x = pre(data)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32


def test_gif_first_frame_only(pre: Preprocessor) -> None:
    red, blue = (Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255)))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    assert tuple(rgb_of(pre, data)[5, 5]) == (255, 0, 0)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (20, 20), 77), (77, 77, 77)),
        (lambda: Image.new("1", (20, 20), 1), (255, 255, 255)),
        (lambda: Image.new("LA", (20, 20), (0, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("LA", (20, 20), (40, 255)), (40, 40, 40)),
        (lambda: Image.new("RGBA", (20, 20), (10, 20, 30, 0)), (255, 255, 255)),
        (lambda: Image.new("RGBA", (20, 20), (10, 20, 30, 255)), (10, 20, 30)),
        (lambda: Image.new("RGBA", (20, 20), (0, 0, 0, 128)), (127, 127, 127)),  # half over white
        (lambda: Image.new("RGB", (20, 20), (51, 102, 153)).convert("P"), (51, 102, 153)),
        (lambda: Image.new("CMYK", (20, 20), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("I;16", (20, 20), 65535), (255, 255, 255)),
        (lambda: Image.new("I;16", (20, 20), 32896), (128, 128, 128)),  # scaled by range, not clipped
        (lambda: Image.new("I", (20, 20), 257 * 10), (10, 10, 10)),
        (lambda: Image.new("F", (20, 20), 0.5), (128, 128, 128)),
        (lambda: Image.new("YCbCr", (20, 20), (255, 128, 128)), (255, 255, 255)),
    ],
    ids=[
        "L",
        "1",
        "LA-clear",
        "LA-opaque",
        "RGBA-clear",
        "RGBA-opaque",
        "RGBA-half",
        "P",
        "CMYK",
        "I16-max",
        "I16-mid",
        "I",
        "F",
        "YCbCr",
    ],
)
def test_modes_convert_to_rgb(make, expected) -> None:
    out = np.asarray(to_mode(make(), "RGB"))
    assert out.shape == (20, 20, 3)
    np.testing.assert_allclose(out[10, 10], expected, atol=1)


def test_palette_with_transparency_and_16bit_png_roundtrip(pre: Preprocessor) -> None:
    p = Image.new("P", (20, 20), 0)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p.putpixel((3, 3), 1)
    p.info["transparency"] = 0
    out = rgb_of(pre, encode(p, "PNG"))
    assert tuple(out[10, 10]) == (255, 255, 255) and tuple(out[3, 3]) == (200, 10, 10)
    g16 = Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))
    assert tuple(rgb_of(pre, encode(g16, "PNG"))[0, 0]) == (255, 255, 255)
    cmyk_jpeg = encode(Image.new("CMYK", (20, 20), (0, 0, 0, 0)), "JPEG", quality=95)
    assert np.asarray(rgb_of(pre, cmyk_jpeg)).mean() > 240


def test_exif_orientation_is_applied(pre: Preprocessor) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = rgb_of(pre, encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


def test_limits_are_checked_from_the_header_before_decoding(pre: Preprocessor) -> None:
    bomb = huge_canvas_png(30000, 30000)
    assert len(bomb) < 200
    t0 = time.perf_counter()
    with pytest.raises(PayloadTooLarge) as e:
        pre(bomb)
    assert time.perf_counter() - t0 < 0.5 and e.value.code == "too_many_pixels" and e.value.limit == 1_000_000
    with pytest.raises(PayloadTooLarge, match="1200000 pixels; the limit is 1000000"):
        pre(huge_canvas_png(1200, 1000))
    with pytest.raises(Unprocessable) as e:
        pre(encode(Image.new("RGB", (15, 100)), "PNG"))
    assert e.value.code == "image_too_small" and e.value.limit == 16


def test_rejects_non_raster_and_corrupt_input(pre: Preprocessor) -> None:
    for data in (
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"%PDF-1.7",
        encode(Image.new("RGB", (20, 20)), "ICO"),
        encode(Image.new("RGB", (20, 20)), "PPM"),
        b"\x00" * 100,
    ):
        with pytest.raises(UnsupportedMediaType):
            pre(data)
    good = encode(Image.fromarray(image_array(64, 64)), "JPEG")
    with pytest.raises(BadRequest) as e:
        pre(good[: len(good) // 2])
    assert e.value.code == "corrupt_image"
    with pytest.raises(BadRequest):
        pre(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(BadRequest):
        pre(b"")


def test_large_jpeg_uses_draft_mode_and_stays_close(pre: Preprocessor) -> None:
    big = Image.fromarray(image_array(800, 600, seed=3)).resize((800, 600))
    data = encode(big, "JPEG", quality=92)
    decoded = pre.decode(data)
    assert decoded.size == (100, 75)  # DCT-scaled by 8: still >= 2x the 32 px input on both sides
    full = (
        Image.open(__import__("io").BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    )
    ours = pre.resize(decoded)
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(full, dtype=int)).mean() < 3


def test_kept_image_is_the_full_resolution_decode(pre: Preprocessor) -> None:
    """An overlay is drawn on the photo's own pixels, not on the model's draft decode scaled back up; the
    model input is the same whether or not the image is kept."""
    import io

    data = encode(Image.fromarray(image_array(800, 600, seed=4)), "JPEG", quality=92)
    kept = pre.process(data, keep_image=True)
    plain = pre.process(data)
    assert kept.size == plain.size == (800, 600) and plain.image is None and kept.image is not None
    assert kept.image.size == (800, 600)
    np.testing.assert_array_equal(
        np.asarray(kept.image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    )
    np.testing.assert_array_equal(kept.array, plain.array)
    small = encode(Image.fromarray(image_array(40, 30, seed=4)), "PNG")  # no draft: the one decode is kept
    assert pre.process(small, keep_image=True).image.size == (40, 30)


def test_normalization_is_bitwise_the_reference_formula(pre: Preprocessor) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = pre.to_array(Image.fromarray(arr))
    x = arr.astype(np.float32) / 255.0
    ref = ((x - np.array(SPEC.mean, np.float32)) / np.array(SPEC.std, np.float32)).transpose(2, 0, 1)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(pre.denormalize(ours), arr)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from(
        [
            b"\xff\xd8\xff",
            b"\x89PNG\r\n\x1a\n",
            b"GIF89a",
            b"RIFF\x00\x00\x00\x00WEBP",
            b"BM",
            b"II*\x00",
            b"MM\x00*",
        ]
    ),
    tail=st.binary(max_size=300),
)
def test_garbage_behind_a_valid_signature_only_raises_client_errors(
    pre: Preprocessor, prefix: bytes, tail: bytes
) -> None:
    try:
        pre(prefix + tail)
    except ServiceError as e:
        assert 400 <= e.status < 500
