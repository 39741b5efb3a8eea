"""Request images: a Fashion-MNIST test image, a generated photo, or a file, as PNG bytes."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

from .common import (
    FMNIST_TEST_IMAGES,
    _logger,
)


# ------------------------------------------------------------------------------------------ images
def fmnist_test_image(index: int = 0, path: Path = FMNIST_TEST_IMAGES) -> Image.Image | None:
    """One Fashion-MNIST test image (28x28 L) read straight from the idx file (no torch), or None."""
    if not path.is_file():
        return None
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        magic = f.read(4)
        if magic[:2] != b"\x00\x00" or magic[2] != 0x08 or magic[3] != 3:
            _logger.warning("%s: not an idx3 uint8 file; using a generated image", path)
            return None
        n, h, w = (int.from_bytes(f.read(4), "big") for _ in range(3))
        index %= n
        f.seek(16 + index * h * w)
        data = f.read(h * w)
    return Image.fromarray(np.frombuffer(data, np.uint8).reshape(h, w), mode="L")


def photo_like_image(size: int, seed: int = 0) -> Image.Image:
    """An RGB image with photo-like statistics (1/f noise over smooth shapes), so PNG sizes and decode
    times resemble a photo rather than a flat test pattern."""
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size, 3), np.float32)
    for octave in range(7):
        cells = 2**octave + 1
        for c in range(3):
            field_ = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), mode="F")
            up = np.asarray(field_.resize((size, size), Image.Resampling.BICUBIC), np.float32)
            out[:, :, c] += up * 60.0 / (1.6**octave)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out += (np.stack([xx, yy, 1 - xx], -1) * 80.0)[..., :3]
    out += rng.normal(0, 4, out.shape)
    return Image.fromarray(np.clip(out + 60, 0, 255).astype(np.uint8), mode="RGB")


def make_png(size: int, source: str, seed: int = 0) -> tuple[bytes, str]:
    """The request body: a PNG of ``size`` x ``size`` from ``source`` (fmnist | photo | a file path)."""
    img: Image.Image | None = None
    what = source
    if source == "fmnist":
        img = fmnist_test_image(seed)
        if img is None:
            _logger.warning(
                "Fashion-MNIST not found at %s; using a generated photo-like image", FMNIST_TEST_IMAGES
            )
            source = "photo"
        else:
            img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            what = f"Fashion-MNIST test image {seed} upscaled 28 -> {size}"
    if source == "photo":
        img = photo_like_image(size, seed)
        what = f"generated photo-like RGB {size}x{size}"
    elif img is None:
        with Image.open(source) as im:
            img = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        what = f"{source} resized to {size}x{size}"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), what
