"""Metrics for the dense tasks: semantic-segmentation mIoU (mmsegmentation's definitions) and COCO
box/mask mAP.

``SegmentationMeter`` accumulates a confusion matrix (one ``np.bincount`` per update), so it is cheap to
feed every validation batch. ``coco_evaluate`` wraps pycocotools' ``COCOeval`` with its console output
suppressed; all numbers are percentages rounded to 2 decimals.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import DataError

_logger = logging.getLogger(__name__)


def _to_numpy(x: Any) -> np.ndarray:
    """numpy or torch (any device) -> numpy, without importing torch here."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class SegmentationMeter:
    """Confusion-matrix segmentation metrics over ``num_classes`` labels; ``ignore_index`` pixels are skipped.

    ``compute()`` follows mmsegmentation: per-class IoU = TP / (TP + FP + FN); a class absent from both the
    ground truth and the predictions has IoU ``None`` and is left out of mIoU; mean accuracy averages the
    per-class recall over classes present in the ground truth.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = np.zeros(
            (num_classes, num_classes), dtype=np.int64
        )  # rows: ground truth, cols: prediction

    def reset(self) -> None:
        self.confusion[:] = 0

    def update(self, pred: Any, target: Any) -> None:
        """Add predictions and targets: integer arrays (numpy or torch) of equal shape [H, W] or [B, H, W]."""
        p, t = _to_numpy(pred), _to_numpy(target)
        if p.shape != t.shape or p.ndim not in (2, 3):
            raise ValueError(f"pred and target must both be [H, W] or [B, H, W]; got {p.shape} and {t.shape}")
        if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(t.dtype, np.integer)):
            raise ValueError(f"pred and target must be integer arrays; got {p.dtype} and {t.dtype}")
        keep = t != self.ignore_index
        p, t = p[keep].astype(np.int64), t[keep].astype(np.int64)
        k = self.num_classes
        # Out-of-range labels are bugs (wrong num_classes, unmapped ids): fail instead of silently dropping
        # them.
        if t.size and (t.min() < 0 or t.max() >= k):
            raise ValueError(f"target labels outside 0..{k - 1} (and != ignore_index {self.ignore_index})")
        if p.size and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"predicted labels outside 0..{k - 1}")
        self.confusion += np.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, Any]:
        """{"mIoU", "pixel_acc", "mean_acc"} in % (2 decimals) and "per_class_iou" (% or None)."""
        cm = self.confusion.astype(np.float64)
        tp, gt, pr = np.diag(cm), cm.sum(1), cm.sum(0)
        union = gt + pr - tp
        present = union > 0
        iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
        acc = np.divide(tp, gt, out=np.zeros_like(tp), where=gt > 0)
        total = cm.sum()

        def pct(x: float) -> float:
            return round(float(x) * 100.0, 2)

        return {
            "mIoU": pct(iou[present].mean()) if present.any() else 0.0,
            "pixel_acc": pct(tp.sum() / total) if total else 0.0,
            "mean_acc": pct(acc[gt > 0].mean()) if (gt > 0).any() else 0.0,
            "per_class_iou": [pct(v) if ok else None for v, ok in zip(iou, present, strict=True)],
        }


def masks_to_rle(masks: Any) -> list[dict[str, Any]]:
    """Binary masks [N, H, W] (numpy or torch) -> COCO compressed RLEs with ``counts`` as str (JSON-ready)."""
    from pycocotools import mask as mask_utils

    m = _to_numpy(masks)
    if m.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got {m.shape}")
    if len(m) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray((m != 0).transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def load_coco(ann_file: str | Path) -> Any:
    """A pycocotools ``COCO`` from a JSON file, quietly; DataError for a missing or malformed file."""
    from pycocotools.coco import COCO

    path = Path(ann_file)
    if not path.is_file():
        raise DataError(f"{path}: COCO annotation file not found")
    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(dataset, dict) or not all(
        isinstance(dataset.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DataError(
            f"{path}: not a COCO instances file (needs 'images', 'annotations' and 'categories' lists)"
        )
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed COCO entry ({type(e).__name__}: {e})") from e
    return coco


_STAT_NAMES = ("mAP", "mAP_50", "mAP_75")  # COCOeval.stats[0:3]


def _normalize(det: dict[str, Any]) -> dict[str, Any]:
    out = {
        "image_id": int(det["image_id"]),
        "category_id": int(det["category_id"]),
        "score": float(det["score"]),
    }
    if det.get("bbox") is not None:
        out["bbox"] = [float(v) for v in det["bbox"]]
    if det.get("segmentation") is not None:
        seg = det["segmentation"]
        if not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
            raise ValueError(
                "detection segmentations must be compressed RLEs (see masks_to_rle), "
                f"got {type(seg).__name__}"
            )
        out["segmentation"] = copy.deepcopy(seg)
    return out


def coco_evaluate(
    coco_gt: Any,
    detections: Iterable[dict[str, Any]],
    iou_types: Sequence[str] = ("bbox", "segm"),
    img_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """COCO mAP of ``detections`` against ``coco_gt`` (a pycocotools ``COCO`` or a path to its JSON).

    ``detections``: dicts with "image_id", "category_id" (the dataset's own ids), "bbox" [x, y, w, h],
    "score" and optionally "segmentation" (compressed RLE, e.g. from ``masks_to_rle``). Returns
    ``{"<type>_mAP", "<type>_mAP_50", "<type>_mAP_75"}`` in % for each type in ``iou_types``. No detections
    at all scores 0 for every type; "segm" is left out when detections exist but none carries a
    segmentation. ``img_ids`` restricts scoring to the images that were run (a subset of the ground truth).
    Mask AP uses mask areas for the small/medium/large ranges (the box is dropped, as
    detectron2 does). A metric COCOeval cannot define (no ground truth at all) is reported as 0.
    """
    from pycocotools.cocoeval import COCOeval

    for t in iou_types:
        if t not in ("bbox", "segm"):
            raise ValueError(f"iou_types must be 'bbox' and/or 'segm', got {t!r}")
    gt = load_coco(coco_gt) if isinstance(coco_gt, str | Path) else coco_gt
    dets = [_normalize(d) for d in detections]  # copies: loadRes writes into its input
    results: dict[str, float] = {}
    known = set(gt.getImgIds())
    unknown = {d["image_id"] for d in dets} - known
    if unknown:
        raise ValueError(f"detections for image ids not in the ground truth: {sorted(unknown)[:10]}")
    for iou_type in iou_types:
        if iou_type == "bbox":
            subset = [dict(d) for d in dets if "bbox" in d]  # loadRes adds box polygons to its input
        else:
            # Without the box, loadRes takes the area (and box) from the mask.
            subset = [{k: v for k, v in d.items() if k != "bbox"} for d in dets if "segmentation" in d]
            if dets and not subset:
                continue
        if len(subset) < len(dets):
            _logger.warning(
                "%d of %d detections lack a %s and are not scored for it",
                len(dets) - len(subset),
                len(dets),
                iou_type,
            )
        if not subset:
            results.update({f"{iou_type}_{n}": 0.0 for n in _STAT_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(subset)
            ev = COCOeval(gt, dt, iou_type)
            if img_ids is not None:
                ev.params.imgIds = sorted(set(img_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        results.update(
            {
                f"{iou_type}_{n}": round(max(float(s), 0.0) * 100.0, 2)
                for n, s in zip(_STAT_NAMES, ev.stats[:3], strict=True)
            }
        )
    return results
