"""Post-processing of the dense heads (``segment``, ``detect``): numpy and Pillow only (no torch).

Label maps are returned at the **original** image size: the logits ``[C, h, w]`` (the graph's input
resolution) are resized **bilinearly** to the original ``H x W`` (half-pixel centres, as PIL, OpenCV
and torch ``align_corners=False``), then the argmax over classes is taken. Resizing before the argmax
gives smooth class boundaries; argmax-then-nearest would give ``H/h``-pixel staircase blocks. The work
is done in row chunks, so memory stays ``O(C * chunk * W)`` even for large images; the cost is
``O(C * H * W)``.

Detections: boxes come in input pixels of the ``S x S`` model input and are scaled by ``W/S`` and
``H/S`` back to original pixels (then clipped to the image). Instance masks (probabilities at the input
resolution) are resized bilinearly to ``H x W`` and thresholded at ``MASK_THRESHOLD`` (> 0.5 is in).

RLE (``masks=rle``): COCO's *uncompressed* RLE, ``{"size": [H, W], "counts": [...]}``: run lengths of
the mask flattened in **column-major** order (down each column, then the next column), alternating
0-runs and 1-runs and starting with a 0-run (0 when the first pixel is set), so the counts sum to
``H * W``; ``pycocotools.mask.frPyObjects`` reads it as is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .bundle import Bundle

MASK_THRESHOLD = 0.5
_CHUNK_ELEMENTS = 1 << 22  # floats per chunk of the row-wise resize (16 MiB of float32)


def _axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a half-pixel bilinear resize along one axis."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _resized_rows(x: np.ndarray, height: int, width: int) -> Any:
    """Yield ``(row slice, [C, rows, width] float32)``: ``x`` [C, h, w] resized bilinearly, in chunks."""
    c, h, w = x.shape
    x = x.astype(np.float32, copy=False)
    c0, c1, cw = _axis(width, w)
    xw = x[:, :, c0] * (1.0 - cw) + x[:, :, c1] * cw  # [C, h, width]: columns first (h is small)
    r0, r1, rw = _axis(height, h)
    step = max(1, _CHUNK_ELEMENTS // max(1, c * width))
    for a in range(0, height, step):
        b = min(height, a + step)
        wy = rw[a:b, None]
        yield slice(a, b), xw[:, r0[a:b], :] * (1.0 - wy) + xw[:, r1[a:b], :] * wy


def label_map(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Class ids [height, width] (uint8, or uint16 past 256 classes) from logits [C, h, w]."""
    c = logits.shape[0]
    out = np.empty((height, width), dtype=np.uint8 if c <= 256 else np.uint16)
    for rows, chunk in _resized_rows(logits, height, width):
        out[rows] = chunk.argmax(axis=0)
    return out


def resize_mask(prob: np.ndarray, height: int, width: int, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """A binary mask [height, width] from probabilities [h, w] (or [1, h, w])."""
    prob = prob.reshape(1, *prob.shape[-2:])
    out = np.empty((height, width), dtype=bool)
    for rows, chunk in _resized_rows(prob, height, width):
        out[rows] = chunk[0] > threshold
    return out


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a binary mask [H, W] (column-major runs, starting with a 0-run)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [h, w], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": [h, w], "counts": counts}


def class_pixels(labels: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """Pixels and fraction of the image per class (every class, in id order)."""
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    total = max(1, labels.size)
    return [
        {
            "id": i,
            "name": classes[i] if i < len(classes) else f"class_{i}",
            "pixels": int(n),
            "fraction": n / total,
        }
        for i, n in enumerate(counts.tolist())
    ]


def palette(n: int) -> np.ndarray:
    """[n, 3] uint8 colours, the PASCAL VOC bit-interleaved palette (0 = background = black)."""
    ids = np.arange(n)
    out = np.zeros((n, 3), dtype=np.int64)
    for bit in range(8):
        for ch in range(3):
            out[:, ch] |= ((ids >> (3 * bit + ch)) & 1) << (7 - bit)
    return out.astype(np.uint8)


def overlay(image: Image.Image, labels: np.ndarray, num_classes: int, alpha: float) -> np.ndarray:
    """uint8 [H, W, 3]: the image with every non-background pixel blended with its class colour."""
    h, w = labels.shape
    rgb = image.convert("RGB")
    if rgb.size != (w, h):  # a JPEG decoded at reduced scale (draft): back to the original size
        rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
    base = np.asarray(rgb, dtype=np.float32)
    colours = palette(max(num_classes, int(labels.max(initial=0)) + 1)).astype(np.float32)[labels]
    fg = (labels > 0)[:, :, None]
    mixed = np.where(fg, base * (1.0 - alpha) + colours * alpha, base)
    return np.rint(mixed).astype(np.uint8)


def scale_boxes(boxes: np.ndarray, input_size: int, width: int, height: int) -> np.ndarray:
    """Boxes [N, 4] (x1, y1, x2, y2) in input pixels of the S x S model input -> original pixels."""
    scale = np.array([width, height, width, height], dtype=np.float64) / float(input_size)
    out = boxes.astype(np.float64).reshape(-1, 4) * scale
    return np.clip(out, 0.0, np.array([width, height, width, height], dtype=np.float64))


def select_detections(scores: np.ndarray, score_threshold: float, max_detections: int) -> np.ndarray:
    """Indices of the detections kept: score >= threshold, best first, at most ``max_detections``."""
    scores = scores.reshape(-1)
    keep = np.flatnonzero(scores >= score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]  # the graph sorts; do not rely on it
    return keep[:max_detections]


def check_outputs(bundle: Bundle, task: str, out: Any) -> None:
    """Raise ValueError if a warm-up output of a dense task breaks the contract (docs/serving.md)."""
    if task == "segment":
        classes = bundle.classes(task)
        if not isinstance(out, np.ndarray) or out.ndim != 4 or out.shape[:2] != (1, len(classes)):
            raise ValueError(
                f"logits must be [batch, {len(classes)}, H, W] (one channel per class), "
                f"got {list(getattr(out, 'shape', []))}"
            )
        if not np.isfinite(out).all():
            raise ValueError("logits are not finite")
    elif task == "detect":
        if not isinstance(out, list) or len(out) != 1:
            raise ValueError("detect must return one set of outputs per image")
        o = out[0]
        missing = {"boxes", "labels", "scores", "masks"} - set(o)
        if missing:
            raise ValueError(f"outputs {sorted(missing)} missing (the spec's outputs are {list(o)})")
        n = o["boxes"].shape[0] if o["boxes"].ndim == 2 else -1
        if o["boxes"].shape != (n, 4) or o["labels"].shape != (n,) or o["scores"].shape != (n,):
            raise ValueError(
                "expected boxes [N, 4], labels [N], scores [N]; got "
                + ", ".join(f"{k} {list(o[k].shape)}" for k in ("boxes", "labels", "scores"))
            )
        if o["masks"].ndim not in (3, 4) or o["masks"].shape[0] != n:
            raise ValueError(f"expected masks [N, 1, H, W]; got {list(o['masks'].shape)}")
        if not all(np.isfinite(o[k]).all() for k in ("boxes", "scores", "masks")):
            raise ValueError("boxes, scores or masks are not finite")
