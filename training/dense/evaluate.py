"""Dense-head evaluation over a loader (segmentation mIoU, COCO box/mask mAP) and prediction-grid PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..runtime import autocast, resolve_precision
from .grid import PALETTE as _PALETTE
from .models import CAESegmenter

__all__ = ["agnostic_nms", "evaluate_detection", "evaluate_segmentation", "save_prediction_grid"]


@torch.no_grad()
def evaluate_segmentation(
    model: CAESegmenter, loader: DataLoader, num_classes: int, device: torch.device, precision: str = "fp32"
) -> dict[str, Any]:
    from .metrics import SegmentationMeter

    model.eval()
    meter = SegmentationMeter(num_classes)
    for x, y in loader:
        with autocast(device, resolve_precision(precision, device)):
            logits = model(x.to(device))
        meter.update(logits.argmax(1).cpu().numpy(), y.numpy())
    return meter.compute()


def agnostic_nms(out: dict[str, Tensor], iou: float | None) -> dict[str, Tensor]:
    """One image's detections after class-agnostic NMS (torchvision's rule, as the service's numpy one)."""
    if iou is None or len(out["boxes"]) < 2:
        return out
    from torchvision.ops import nms

    keep = nms(out["boxes"].float(), out["scores"].float(), iou)
    return {k: v[keep] for k, v in out.items()}


@torch.no_grad()
def evaluate_detection(
    model: nn.Module, loader: DataLoader, source: Any, device: torch.device, nms_iou: float | None = None
) -> dict[str, Any]:
    from .metrics import coco_evaluate, masks_to_rle

    model.eval()
    dets: list[dict[str, Any]] = []
    seen: list[int] = []
    cat_ids = list(source.cat_ids)
    for images, targets in loader:
        outs = [agnostic_nms(o, nms_iou) for o in model([im.to(device) for im in images])]
        for im, out, tgt in zip(images, outs, targets, strict=True):
            seen.append(int(tgt["image_id"]))
            # back to the canvas the ground truth is in (v2 scenes vary in size; the model sees S x S)
            info = source.coco.imgs[int(tgt["image_id"])]
            w, h = int(info["width"]), int(info["height"])
            s_h, s_w = im.shape[-2:]
            boxes = (out["boxes"].cpu() * torch.tensor([w / s_w, h / s_h, w / s_w, h / s_h])).numpy()
            probs = out["masks"].cpu().float()
            if len(probs) and tuple(probs.shape[-2:]) != (h, w):
                probs = torch.nn.functional.interpolate(
                    probs, size=(h, w), mode="bilinear", align_corners=False
                )
            masks = (probs[:, 0] > 0.5).numpy().astype(np.uint8)
            rles = masks_to_rle(masks) if len(masks) else []
            for j in range(len(boxes)):
                x1, y1, x2, y2 = boxes[j].tolist()
                dets.append(
                    {
                        "image_id": int(tgt["image_id"]),
                        "category_id": int(cat_ids[int(out["labels"][j]) - 1]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(out["scores"][j]),
                        "segmentation": rles[j],
                    }
                )
    res = coco_evaluate(source.coco, dets, img_ids=seen)
    res["detections"] = len(dets)
    return res


def _denorm(x: Tensor, pre: dict[str, Any]) -> np.ndarray:
    m = torch.tensor(pre["mean"]).view(3, 1, 1)
    s = torch.tensor(pre["std"]).view(3, 1, 1)
    return ((x.cpu().float() * s + m).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@torch.no_grad()
def save_prediction_grid(
    model: nn.Module,
    ds: Dataset,
    task: str,
    pre: dict[str, Any],
    path: Path,
    device: torch.device,
    n: int = 6,
    scale: int = 3,
    score_threshold: float = 0.5,
    classes: list[str] | None = None,
    nms_iou: float | None = None,
) -> None:
    """PNG rows: image | ground truth | prediction, over a legend of the class colours (:mod:`.grid`).
    Segment: colour label maps; detect: masks, boxes and "<class> <score>" tags of the detections scoring
    above ``score_threshold`` after the class-agnostic NMS at ``nms_iou`` (None: off). ``scale`` is kept
    for callers; tiles are sized by grid.TILE."""
    from .grid import compose_grid, det_tile, seg_tile

    model.eval()
    k = max(len(_PALETTE), 11)
    names = list(classes) if classes else [str(i) for i in range(k)]
    rows = []
    for i in range(min(n, len(ds))):  # type: ignore[arg-type]
        x, y = ds[i]
        img = _denorm(x, pre)
        if task == "segment":
            pred = model(x[None].to(device)).argmax(1)[0].cpu().numpy()
            gt = np.where(y.numpy() == 255, 0, y.numpy())
            rows.append([det_tile(img, np.zeros((0, 4)), [], names), seg_tile(gt), seg_tile(pred)])
        else:
            out = agnostic_nms(model([x.to(device)])[0], nms_iou)
            keep = out["scores"] > score_threshold
            gt_tile = det_tile(img, y["boxes"].numpy(), y["labels"].tolist(), names, None, y["masks"].numpy())
            pr_tile = det_tile(
                img,
                out["boxes"][keep].cpu().numpy(),
                out["labels"][keep].tolist(),
                names,
                out["scores"][keep].tolist(),
                (out["masks"][keep, 0] > 0.5).cpu().numpy(),
            )
            rows.append([det_tile(img, np.zeros((0, 4)), [], names), gt_tile, pr_tile])
    compose_grid(rows, names, path)
