"""Post-processing of the dense heads (``segment``, ``detect``): numpy and Pillow only (no torch).

Label maps are returned at the **original** image size: the logits ``[C, h, w]`` (the graph's input
resolution) are resized **bilinearly** to the original ``H x W`` (half-pixel centres, as PIL, OpenCV
and torch ``align_corners=False``), then the argmax over classes is taken. Resizing before the argmax
gives smooth class boundaries; argmax-then-nearest would give ``H/h``-pixel staircase blocks. The work
is done in row chunks, so memory stays ``O(C * chunk * W)`` even for large images; the cost is
``O(C * H * W)``.

Detections: the graph's NMS is per class; ``select_detections`` adds a class-agnostic NMS (IoU threshold
``nms_iou_threshold`` of the task's spec entry, off when absent) so that one garment gives one box. Boxes
come in input pixels of the ``S x S`` model input and are scaled by ``W/S`` and
``H/S`` back to original pixels (then clipped to the image). Instance masks (probabilities at the input
resolution) are resized bilinearly to ``H x W`` and thresholded at ``MASK_THRESHOLD`` (> 0.5 is in).

RLE (``masks=rle``): COCO's *uncompressed* RLE, ``{"size": [H, W], "counts": [...]}``: run lengths of
the mask flattened in **column-major** order (down each column, then the next column), alternating
0-runs and 1-runs and starting with a 0-run (0 when the first pixel is set), so the counts sum to
``H * W``; ``pycocotools.mask.frPyObjects`` reads it as is.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
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


def resized_rows(x: np.ndarray, height: int, width: int) -> Any:
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
    """Class ids [height, width] (uint8, or uint16 past 256 classes) from logits [C, h, w].

    Exactly the argmax of the bilinearly resized logits, computed only where it can differ from the
    corners: an output pixel's logits are a convex combination of its four source pixels' logits, so
    when those four share their argmax, it is the pixel's argmax too (``sum w_i l_i[c] >= sum w_i l_i[k]``).
    Such "uniform" cells are filled from the low-resolution argmax; the rest (class boundaries, a small
    fraction of a photo) are resized and argmaxed with the same float32 operations as ``resized_rows``."""
    c, h, w = logits.shape
    dtype = np.uint8 if c <= 256 else np.uint16
    x = logits.astype(np.float32, copy=False)
    c0, c1, cw = _axis(width, w)
    r0, r1, rw = _axis(height, h)
    low = x.argmax(axis=0)  # [h, w]
    nxt_r = np.minimum(np.arange(h) + 1, h - 1)
    nxt_c = np.minimum(np.arange(w) + 1, w - 1)
    # cell (a, b): corners (a, b), (a+1, b), (a, b+1), (a+1, b+1) (clamped), as _axis pairs them
    uniform = (low == low[nxt_r]) & (low == low[:, nxt_c]) & (low == low[nxt_r][:, nxt_c])
    # nearest-cell fill (r0, c0 are non-decreasing: repeats, not a 2-D gather)
    out = np.repeat(
        np.repeat(low.astype(dtype), np.bincount(r0, minlength=h), axis=0),
        np.bincount(c0, minlength=w),
        axis=1,
    )
    if uniform.all():
        return out
    starts = np.flatnonzero(np.r_[True, r0[1:] != r0[:-1]])  # output row bands sharing a source row
    ends = np.r_[starts[1:], height]
    for y0, y1 in zip(starts.tolist(), ends.tolist(), strict=True):
        a = int(r0[y0])
        cols = np.flatnonzero(~uniform[a][c0])
        if cols.size == 0:
            continue
        a1 = int(r1[y0])
        cc0, cc1, ccw = c0[cols], c1[cols], cw[cols]
        top = x[:, a, cc0] * (1.0 - ccw) + x[:, a, cc1] * ccw  # [C, n]: as xw[:, a] in resized_rows
        bot = x[:, a1, cc0] * (1.0 - ccw) + x[:, a1, cc1] * ccw
        wy = rw[y0:y1, None]
        out[y0:y1, cols] = (top[:, None, :] * (1.0 - wy) + bot[:, None, :] * wy).argmax(axis=0)
    return out


def label_map_reference(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """``label_map`` computed everywhere (the definition; tests compare the two)."""
    c = logits.shape[0]
    out = np.empty((height, width), dtype=np.uint8 if c <= 256 else np.uint16)
    for rows, chunk in resized_rows(logits, height, width):
        out[rows] = chunk.argmax(axis=0)
    return out


def mask_window(
    prob: np.ndarray, height: int, width: int, threshold: float = MASK_THRESHOLD
) -> tuple[int, int, np.ndarray]:
    """The part of ``resize_mask`` that can be set: ``(y0, x0, crop)`` with ``crop`` the binary mask of
    rows ``y0..`` and columns ``x0..`` of the [height, width] result (zero outside). An output pixel can
    exceed the threshold only if one of its four source pixels does, so only those pixels are resized,
    with the same float32 operations as ``resized_rows``."""
    p: np.ndarray = prob.reshape(prob.shape[-2:]).astype(np.float32, copy=False)
    h, w = p.shape
    hot: np.ndarray = p > threshold
    if not hot.any():
        return 0, 0, np.zeros((0, 0), dtype=bool)
    r0, r1, rw = _axis(height, h)
    c0, c1, cw = _axis(width, w)
    rows_hot = np.asarray(hot.any(axis=1))
    cols_hot = np.asarray(hot.any(axis=0))
    ys = np.flatnonzero(rows_hot[r0] | rows_hot[r1])
    xs = np.flatnonzero(cols_hot[c0] | cols_hot[c1])
    if ys.size == 0 or xs.size == 0:  # downsampling that reads none of the hot pixels
        return 0, 0, np.zeros((0, 0), dtype=bool)
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    cc0, cc1, ccw = c0[x0:x1], c1[x0:x1], cw[x0:x1]
    xw = p[:, cc0] * (1.0 - ccw) + p[:, cc1] * ccw  # [h, x1-x0]
    wy = rw[y0:y1, None]
    crop = xw[r0[y0:y1]] * (1.0 - wy) + xw[r1[y0:y1]] * wy > threshold
    return y0, x0, crop


def resize_mask(prob: np.ndarray, height: int, width: int, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """A binary mask [height, width] from probabilities [h, w] (or [1, h, w])."""
    y0, x0, crop = mask_window(prob, height, width, threshold)
    out = np.zeros((height, width), dtype=bool)
    out[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out


def rle_window(height: int, width: int, y0: int, x0: int, crop: np.ndarray) -> dict[str, Any]:
    """``rle_encode`` of the [height, width] mask that is ``crop`` at (y0, x0) and zero elsewhere,
    touching only the crop's columns (whole columns: the runs go down each column)."""
    ch, cwid = crop.shape
    if ch == 0 or cwid == 0 or not crop.any():
        return {"size": [height, width], "counts": [height * width] if height * width else []}
    block = np.zeros((height, cwid), dtype=bool)
    block[y0 : y0 + ch] = crop
    flat = block.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat[0]:
        counts.insert(0, 0)
    counts[0] += x0 * height  # the zero columns before
    tail = (width - x0 - cwid) * height
    if tail:
        if len(counts) % 2:  # ends on a 0-run
            counts[-1] += tail
        else:
            counts.append(tail)
    return {"size": [height, width], "counts": counts}


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
    if labels.dtype == np.uint8:  # Pillow's C histogram: ~4x np.bincount on a photo-sized map
        counts = np.asarray(Image.fromarray(labels, mode="L").histogram()[: max(len(classes), 1)])
        top = int(labels.max(initial=0))
        if top >= len(classes):
            counts = np.bincount(labels.ravel(), minlength=len(classes))
    else:
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


def overlay_image(image: Image.Image, labels: np.ndarray, num_classes: int, alpha: float) -> Image.Image:
    """The image with every non-background pixel blended with its class colour,
    ``pixel * (1 - alpha) + colour * alpha`` (Pillow's blend and paste in C: within one level of the
    float formula, ``overlay_reference``; exact at alpha 1 and on the background)."""
    h, w = labels.shape
    rgb = image.convert("RGB")
    if rgb.size != (w, h):  # a JPEG decoded at reduced scale (draft): back to the original size
        rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
    elif rgb is image:
        rgb = rgb.copy()
    if labels.dtype != np.uint8:
        return Image.fromarray(overlay_reference(rgb, labels, num_classes, alpha))
    colours = Image.fromarray(labels, mode="P")
    colours.putpalette(palette(256).ravel().tolist())
    blended = Image.blend(rgb, colours.convert("RGB"), alpha)
    rgb.paste(blended, (0, 0), Image.fromarray(labels, mode="L").point([0] + [255] * 255))
    return rgb


def overlay(image: Image.Image, labels: np.ndarray, num_classes: int, alpha: float) -> np.ndarray:
    """uint8 [H, W, 3]: ``overlay_image`` as an array."""
    return np.asarray(overlay_image(image, labels, num_classes, alpha))


def overlay_reference(image: Image.Image, labels: np.ndarray, num_classes: int, alpha: float) -> np.ndarray:
    """``overlay`` by float arithmetic on every pixel (the definition; tests compare the two)."""
    h, w = labels.shape
    rgb = image.convert("RGB")
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
    base = np.asarray(rgb, dtype=np.float32)
    colours = palette(max(num_classes, int(labels.max(initial=0)) + 1)).astype(np.float32)[labels]
    fg = (labels > 0)[:, :, None]
    mixed = np.where(fg, base * (1.0 - alpha) + colours * alpha, base)
    return np.rint(mixed).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bytes(arr: np.ndarray, level: int = 1) -> bytes:
    """A PNG of uint8 [H, W] (grey) or [H, W, 3] (RGB), every row with the "Up" filter: label maps and
    masks repeat rows, which then compress to almost nothing, 2-3x faster than Pillow's adaptive filter
    at the same size. Anything else (16-bit label maps) goes through Pillow."""
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=level)
        return buf.getvalue()
    h, w = arr.shape[:2]
    a = np.ascontiguousarray(arr).reshape(h, -1)
    raw = np.empty((h, a.shape[1] + 1), dtype=np.uint8)
    raw[:, 0] = 2  # Up: each byte minus the one above (mod 256)
    raw[0, 0] = 0
    raw[0, 1:] = a[0]
    np.subtract(a[1:], a[:-1], out=raw[1:, 1:])
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
        + _chunk(b"IEND", b"")
    )


def mask_png(height: int, width: int, y0: int, x0: int, crop: np.ndarray) -> bytes:
    """``png_bytes`` of the 8-bit [height, width] mask that is 255 on ``crop`` at (y0, x0) and 0 elsewhere,
    with the Up-filtered rows written directly: only the window's bytes are computed."""
    raw = np.zeros((height, width + 1), dtype=np.uint8)
    raw[1:, 0] = 2  # Up
    ch, cw = crop.shape
    if ch and cw:
        a = crop.astype(np.uint8) * np.uint8(255)
        window = raw[y0 : y0 + ch, 1 + x0 : 1 + x0 + cw]
        window[0] = a[0]  # the row above the window is zero
        np.subtract(a[1:], a[:-1], out=window[1:])
        if y0 + ch < height:
            raw[y0 + ch, 1 + x0 : 1 + x0 + cw] = np.uint8(0) - a[-1]  # back to zero, mod 256
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))
        + _chunk(b"IEND", b"")
    )


def encode_image(img: np.ndarray | Image.Image, fmt: str) -> bytes:
    """An RGB image as ``png`` (lossless) or ``jpeg`` (quality 90: a photo's overlay in ~1/10 of the time
    and size of its PNG)."""
    if fmt == "jpeg":
        buf = io.BytesIO()
        (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format="JPEG", quality=90)
        return buf.getvalue()
    return png_bytes(np.asarray(img))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def scale_boxes(boxes: np.ndarray, input_size: int, width: int, height: int) -> np.ndarray:
    """Boxes [N, 4] (x1, y1, x2, y2) in input pixels of the S x S model input -> original pixels."""
    scale = np.array([width, height, width, height], dtype=np.float64) / float(input_size)
    out = boxes.astype(np.float64).reshape(-1, 4) * scale
    return np.clip(out, 0.0, np.array([width, height, width, height], dtype=np.float64))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [N, M] of xyxy boxes [N, 4] and [M, 4] (areas (x2 - x1) * (y2 - y1), as torchvision's)."""
    a, b = a.astype(np.float64).reshape(-1, 4), b.astype(np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def agnostic_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-agnostic greedy NMS: indices kept, best score first. A box is dropped when its IoU with a
    better-scoring kept box is **greater** than ``iou_threshold`` (torchvision.ops.nms's rule), whatever
    the classes: the graph's NMS is per class, so one garment can come back as two classes."""
    scores = scores.reshape(-1)
    order = np.argsort(-scores, kind="stable")
    if order.size == 0:
        return order.astype(np.intp)
    iou = box_iou(boxes[order], boxes[order])
    alive = np.ones(order.size, dtype=bool)
    keep = []
    for k in range(order.size):
        if not alive[k]:
            continue
        keep.append(k)
        alive &= ~(iou[k] > iou_threshold)
    return order[np.asarray(keep, dtype=np.intp)]


def select_detections(
    scores: np.ndarray,
    score_threshold: float,
    max_detections: int,
    boxes: np.ndarray | None = None,
    nms_iou: float | None = None,
) -> np.ndarray:
    """Indices of the detections kept: score >= threshold, then (with ``boxes`` and ``nms_iou``)
    class-agnostic NMS at ``nms_iou``, best first, at most ``max_detections``."""
    scores = scores.reshape(-1)
    keep = np.flatnonzero(scores >= score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]  # the graph sorts; do not rely on it
    if boxes is not None and nms_iou is not None and keep.size > 1:
        keep = keep[agnostic_nms(boxes.reshape(-1, 4)[keep], scores[keep], nms_iou)]
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
