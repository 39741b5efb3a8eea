"""Decoding and preprocessing of untrusted image bytes, numpy only (no torch).

Order matters for safety: the format is sniffed from magic bytes, then PIL opens the file lazily (header
only) so the declared size is checked against the pixel and minimum-side limits before a single pixel
is decoded. Only real raster formats are accepted; a JPEG much larger than the model input is decoded
at a reduced DCT scale (draft mode), which is several times faster for photos.

Preprocessing is the bundle's contract (``spec["image"]``): EXIF orientation applied, converted to RGB
(alpha composited on white; 16-bit grey scaled, not clipped), resized to ``size x size`` with the spec's
filter (no crop), then ``(x/255 - mean)/std`` as float32 CHW, through a per-channel lookup table that
gives bit-for-bit the same float32 values as the formula.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .bundle import ImageSpec
from .errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType

_logger = logging.getLogger("service")

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# Pillow's thumbnail() default: decode JPEGs at >= 2x the target size, then resample; visually the same
# as a full decode.
_DRAFT_GAP = 2
_WHITE = (255, 255, 255)


def sniff_format(data: bytes) -> str | None:
    """The allowed format these bytes start with, from magic numbers (None: not an allowed format)."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def configure_pillow(max_pixels: int) -> None:
    """Process-wide Pillow guards: its own bomb check at our limit, and its warning made an error
    (a warning would let a bomb through). Our explicit header check runs as well and names the limit."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _scale_to_uint8(img: Image.Image) -> Image.Image:
    """Greyscale of more than 8 bits to "L" by range, not by clipping (Pillow's convert clips at 255)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        x = np.clip(arr.astype(np.float32), 0, 65535) * np.float32(255.0 / 65535.0)
    else:  # "F": [0, 1] floats if they look like it, else [0, 255]
        x = arr.astype(np.float32)
        x = x * 255.0 if np.nanmax(x, initial=0.0) <= 1.0 else x
    x = np.nan_to_num(x, nan=0.0)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), mode="L")


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode`` ("RGB" or "L"), handling every Pillow mode a decoder can return."""
    if img.mode == mode:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _scale_to_uint8(img)
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", img.size, _WHITE)
        bg.paste(rgba, (0, 0), rgba)  # alpha compositing over white
        img = bg
    try:
        return img.convert(mode)
    except (ValueError, OSError):
        raise UnsupportedMediaType(
            f"colour mode {img.mode} cannot be converted to {mode}", code="unsupported_mode"
        ) from None


@dataclass(frozen=True)
class Limits:
    max_pixels: int
    min_side: int


@dataclass(frozen=True)
class Decoded:
    array: np.ndarray  # float32 [C, size, size], normalized
    size: tuple[int, int]  # (width, height) of the original image, upright
    image: Image.Image | None = None  # the decoded image, when kept


class Preprocessor:
    """bytes -> float32 [C, size, size] normalized as the bundle says. Thread-safe (no mutable state)."""

    def __init__(self, image: ImageSpec, limits: Limits) -> None:
        self.spec = image
        self.limits = limits
        self.mode = "RGB" if image.channels == 3 else "L"
        self.resample = _RESAMPLE[image.interpolation]
        mean = np.asarray(image.mean, dtype=np.float32)[:, None]
        std = np.asarray(image.std, dtype=np.float32)[:, None]
        # the same float32 ops as the reference (x/255 - mean)/std, evaluated once per byte value
        self._lut = ((np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)) - mean) / std

    def open(self, data: bytes, label: str = "image") -> Image.Image:
        """Open lazily and check format and declared size; nothing is decoded yet."""
        if not data:
            raise BadRequest(f"{label}: empty", code="empty_image")
        fmt = sniff_format(data)
        if fmt is None:
            raise UnsupportedMediaType(
                f"{label}: not a supported image format (accepted: {', '.join(ALLOWED_FORMATS)})",
                code="unsupported_format",
            )
        try:
            img = Image.open(io.BytesIO(data), formats=[fmt])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # Pillow's own check (at the same limit) fired first; its message carries the pixel count
            m = re.search(r"\((\d+) pixels\)", str(e))
            what = f"{m.group(1)} pixels" if m else "more pixels than the limit"
            raise PayloadTooLarge(
                f"{label}: declares {what}; the limit is {self.limits.max_pixels}",
                code="too_many_pixels",
                limit=self.limits.max_pixels,
            ) from None
        except Exception:
            raise BadRequest(f"{label}: corrupt or truncated {fmt} header", code="corrupt_image") from None
        w, h = img.size
        if w * h > self.limits.max_pixels:
            img.close()
            raise PayloadTooLarge(
                f"{label}: {w}x{h} = {w * h} pixels; the limit is {self.limits.max_pixels}",
                code="too_many_pixels",
                limit=self.limits.max_pixels,
            )
        if min(w, h) < self.limits.min_side:
            img.close()
            raise Unprocessable(
                f"{label}: {w}x{h} is smaller than the minimum side of {self.limits.min_side} px",
                code="image_too_small",
                limit=self.limits.min_side,
            )
        return img

    def decode(self, data: bytes, label: str = "image") -> Image.Image:
        """Decoded, upright, in the model's colour mode (full resolution, or a JPEG draft >= 2x the input)."""
        return self._decode(data, label)[0]

    def _decode(self, data: bytes, label: str, draft: bool = True) -> tuple[Image.Image, tuple[int, int]]:
        """The decoded image and the original (width, height), upright: the declared size, which a JPEG
        decoded in draft mode is smaller than (``draft=False``: always the full resolution)."""
        img = self.open(data, label)
        w, h = img.size
        try:
            if draft and img.format == "JPEG":
                s = self.spec.size * _DRAFT_GAP
                img.draft(None, (s, s))
            img.seek(0)  # first frame of GIF / WebP / TIFF
            img.load()
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            if orientation not in (None, 1):
                img = ImageOps.exif_transpose(img)
                if orientation in (5, 6, 7, 8):  # the transposing orientations swap width and height
                    w, h = h, w
            return to_mode(img, self.mode), (w, h)
        except UnsupportedMediaType:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
            raise PayloadTooLarge(
                f"{label}: too large to decode", code="too_many_pixels", limit=self.limits.max_pixels
            ) from None
        except Exception:
            # truncated data, bad chunks, decoder errors: the message names the input, not the library
            raise BadRequest(
                f"{label}: corrupt or truncated {img.format} data", code="corrupt_image"
            ) from None

    def resize(self, img: Image.Image) -> Image.Image:
        s = self.spec.size
        return img if img.size == (s, s) else img.resize((s, s), self.resample)

    def to_array(self, img: Image.Image) -> np.ndarray:
        """A ``size x size`` image in the model's mode -> float32 [C, size, size], normalized."""
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        out = np.empty((self.spec.channels, *arr.shape[:2]), dtype=np.float32)
        for c in range(self.spec.channels):
            np.take(self._lut[c], arr[:, :, c], out=out[c])
        return out

    def __call__(self, data: bytes, label: str = "image") -> np.ndarray:
        img = self.decode(data, label)
        try:
            return self.to_array(self.resize(img))
        finally:
            img.close()

    def process(self, data: bytes, label: str = "image", keep_image: bool = False) -> Decoded:
        """Like calling it, plus the original size (dense heads answer at that size) and, with
        ``keep_image``, the decoded image at its full resolution (for overlays: a JPEG decoded in draft
        mode for the model is decoded again in full, ~ the cost of upscaling the draft, so an overlay shows
        the photo's own pixels; the model input stays the draft's, so the prediction does not depend on
        whether an overlay was asked for)."""
        img, size = self._decode(data, label)
        try:
            arr = self.to_array(self.resize(img))
            if keep_image and img.size != size:
                img.close()
                img = self._decode(data, label, draft=False)[0]
            return Decoded(arr, size, img if keep_image else None)
        finally:
            if not keep_image:
                img.close()

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """float32 [C, H, W] normalized -> uint8 [H, W, C] (clipped), the inverse of preprocessing."""
        mean = np.asarray(self.spec.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.spec.std, dtype=np.float32)[:, None, None]
        y = np.clip(x * std + mean, 0.0, 1.0) * 255.0
        return np.rint(y).astype(np.uint8).transpose(1, 2, 0)
