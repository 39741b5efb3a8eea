"""Prediction grids for the dense tasks, numpy and Pillow only (no torch): usable on the torch heads and on
an exported bundle alike (``bench/dense_eval.py``, ``training/dense/train.py``).

A grid is one row per image: image | ground truth | prediction, over a legend strip of the class colours.
Segmentation tiles colour every pixel by class; detection tiles blend each instance mask with its class
colour and draw its box with a "<class> <score>" tag (ground truth: the class name only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files import atomic_path

PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
    ],
    dtype=np.uint8,
)
TILE = 256  # each tile's longer side in the grid, px


def colour(label: int) -> tuple[int, int, int]:
    c = PALETTE[int(label) % len(PALETTE)]
    return int(c[0]), int(c[1]), int(c[2])


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def _fit(img: np.ndarray, tile: int = TILE, nearest: bool = True) -> tuple[Image.Image, float]:
    """The image scaled so its longer side is ``tile`` px, and the scale factor."""
    h, w = img.shape[:2]
    f = tile / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    pil = Image.fromarray(img if img.ndim == 3 else np.repeat(img[:, :, None], 3, axis=2))
    return pil.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR), f


def seg_tile(labels: np.ndarray, tile: int = TILE) -> Image.Image:
    return _fit(PALETTE[labels.astype(np.int64) % len(PALETTE)], tile)[0]


def det_tile(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[int],
    classes: Sequence[str],
    scores: Sequence[float] | None = None,
    masks: np.ndarray | None = None,
    tile: int = TILE,
) -> Image.Image:
    """``image`` (uint8 [H, W, 3] or [H, W]) with masks blended, boxes (xyxy, image pixels) and tags."""
    canvas = image.copy() if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    if masks is not None:
        for m, lab in zip(masks.astype(bool), labels, strict=True):
            canvas[m] = (0.5 * canvas[m] + 0.5 * np.array(colour(lab))).astype(np.uint8)
    pil, f = _fit(canvas, tile)
    draw, font = ImageDraw.Draw(pil), _font()
    for k, (b, lab) in enumerate(zip(np.asarray(boxes).reshape(-1, 4).tolist(), labels, strict=True)):
        x0, y0, x1, y1 = (v * f for v in b)
        c = colour(lab)
        draw.rectangle([x0, y0, x1, y1], outline=c, width=2)
        name = classes[lab] if 0 <= lab < len(classes) else str(lab)
        tag = name if scores is None else f"{name} {float(scores[k]):.2f}"
        tw, th = draw.textbbox((0, 0), tag, font=font)[2:]
        ty = y0 - th - 2 if y0 - th - 2 >= 0 else y0 + 1
        draw.rectangle([x0, ty, x0 + tw + 3, ty + th + 2], fill=c)
        draw.text((x0 + 2, ty + 1), tag, fill=(0, 0, 0) if sum(c) > 380 else (255, 255, 255), font=font)
    return pil


def legend(classes: Sequence[str], width: int) -> Image.Image:
    """A strip of class-colour swatches with their names (index 0 = background)."""
    font = _font(12)
    cell, per_row = 20, max(1, width // 150)
    rows = (len(classes) + per_row - 1) // per_row
    pil = Image.new("RGB", (width, rows * cell + 4), (255, 255, 255))
    draw = ImageDraw.Draw(pil)
    for i, name in enumerate(classes):
        x, y = (i % per_row) * 150 + 4, (i // per_row) * cell + 4
        draw.rectangle([x, y, x + 14, y + 14], fill=colour(i), outline=(0, 0, 0))
        draw.text((x + 20, y + 1), f"{i} {name}", fill=(0, 0, 0), font=font)
    return pil


def compose_grid(
    rows: Sequence[Sequence[Image.Image]],
    classes: Sequence[str],
    path: str | Path,
    header: Sequence[str] = ("image", "ground truth", "prediction"),
) -> None:
    """Write ``rows`` of tiles (each padded to TILE x TILE) under a column header, over the legend."""
    n_cols = max(len(r) for r in rows)
    font = _font(13)
    head_h = 20
    grid = Image.new("RGB", (n_cols * (TILE + 4), head_h + len(rows) * (TILE + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(header[:n_cols]):
        draw.text((j * (TILE + 4) + 4, 3), name, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            grid.paste(t, (j * (TILE + 4) + 2, head_h + i * (TILE + 4) + 2))
    leg = legend(classes, grid.width)
    out = Image.new("RGB", (grid.width, grid.height + leg.height), (255, 255, 255))
    out.paste(grid, (0, 0))
    out.paste(leg, (0, grid.height))
    path = Path(path)
    with atomic_path(path, fsync=False) as tmp:
        out.save(tmp, format="PNG")
