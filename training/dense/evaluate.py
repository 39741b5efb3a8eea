"""Dense-head evaluation over a loader (segmentation mIoU, COCO box/mask mAP) and prediction-grid PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..files import atomic_path
from ..runtime import autocast, resolve_precision
from .models import CAESegmenter

__all__ = ["evaluate_detection", "evaluate_segmentation", "save_prediction_grid"]


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


@torch.no_grad()
def evaluate_detection(
    model: nn.Module, loader: DataLoader, source: Any, device: torch.device
) -> dict[str, Any]:
    from .metrics import coco_evaluate, masks_to_rle

    model.eval()
    dets: list[dict[str, Any]] = []
    seen: list[int] = []
    cat_ids = list(source.cat_ids)
    for images, targets in loader:
        outs = model([im.to(device) for im in images])
        for out, tgt in zip(outs, targets, strict=True):
            seen.append(int(tgt["image_id"]))
            boxes = out["boxes"].cpu().numpy()
            masks = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
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


_PALETTE = np.array(
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
) -> None:
    """PNG rows: image | ground truth | prediction (segment: colour label maps; detect: boxes + masks
    of the detections scoring above ``score_threshold``)."""
    from PIL import ImageDraw

    model.eval()
    rows = []
    for i in range(min(n, len(ds))):  # type: ignore[arg-type]
        x, y = ds[i]
        img = _denorm(x, pre)
        if task == "segment":
            pred = model(x[None].to(device)).argmax(1)[0].cpu().numpy()
            gt = np.where(y.numpy() == 255, 0, y.numpy())
            tiles = [img, _PALETTE[gt % len(_PALETTE)], _PALETTE[pred % len(_PALETTE)]]
        else:
            out = model([x.to(device)])[0]
            keep = out["scores"] > score_threshold
            tiles = []
            for boxes, labels, masks in (
                (y["boxes"], y["labels"], y["masks"]),
                (out["boxes"][keep], out["labels"][keep], out["masks"][keep, 0] > 0.5),
            ):
                canvas = img.copy()
                for m, lab in zip(masks.cpu().numpy().astype(bool), labels.tolist(), strict=True):
                    canvas[m] = (0.5 * canvas[m] + 0.5 * _PALETTE[lab % len(_PALETTE)]).astype(np.uint8)
                pil = Image.fromarray(canvas).resize(
                    (img.shape[1] * scale, img.shape[0] * scale), Image.Resampling.NEAREST
                )
                draw = ImageDraw.Draw(pil)
                for b, lab in zip(boxes.cpu().tolist(), labels.tolist(), strict=True):
                    draw.rectangle(
                        [v * scale for v in b], outline=tuple(int(c) for c in _PALETTE[lab % len(_PALETTE)])
                    )
                tiles.append(np.asarray(pil))
            tiles = [
                np.asarray(Image.fromarray(img).resize(tiles[0].shape[1::-1], Image.Resampling.NEAREST))
            ] + tiles
        if task == "segment":
            tiles = [
                np.asarray(
                    Image.fromarray(t).resize(
                        (t.shape[1] * scale, t.shape[0] * scale), Image.Resampling.NEAREST
                    )
                )
                for t in tiles
            ]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    with atomic_path(path, fsync=False) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
