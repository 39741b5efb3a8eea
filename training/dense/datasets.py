"""Datasets for the dense tasks: ADE20K-style semantic segmentation folders and COCO-style instance sets.

Both read what ``training.dense.scenes`` writes, and the real ADE20K / COCO layouts as well:

* ``SegmentationFolder(root, split)``: ``root/images/<split>/*.{png,jpg,jpeg}`` paired by stem with
  ``root/annotations/<split>/<stem>.png``; items are ``(PIL RGB image, uint8 [H, W] label map)``.
* ``CocoInstances(image_dir, ann_file)``: items are ``(PIL RGB image, target)`` in torchvision's detection
  format (xyxy boxes, contiguous labels 1..K, uint8 masks); ``collate_detection`` batches them as lists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data import DataError
from .metrics import load_coco

_logger = logging.getLogger(__name__)

SEG_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SPLIT_ALIASES = {
    "training": "training",
    "train": "training",
    "validation": "validation",
    "val": "validation",
    "test": "validation",
}


def _read_classes(root: Path) -> list[str] | None:
    """Names indexed by label-map value: ``root/classes.json`` (a list, or {"classes": [...]}) or else the
    ``segmentation_classes`` of ``root/../scenes.json``; None when neither exists."""
    candidates = ((root / "classes.json", "classes"), (root.parent / "scenes.json", "segmentation_classes"))
    for path, key in candidates:
        if not path.is_file():
            continue
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
        names = obj.get(key) if isinstance(obj, dict) else obj
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(
                f"{path}: expected a list of class names{f' under {key!r}' if isinstance(obj, dict) else ''}"
            )
        return names
    return None


class SegmentationFolder(Dataset):
    """ADE20K layout. ``split``: "training" or "validation" (aliases "train", "val", "test" -> validation).

    Label maps must be single-channel ("L" or "P") PNGs of the image's size; ``classes`` (names indexed by
    label value, or None) comes from ``root/classes.json`` or the generator's ``root/../scenes.json``.
    ``transforms``, if given, is applied as ``transforms(image, label_map)``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        transforms: Callable[[Image.Image, np.ndarray], Any] | None = None,
    ) -> None:
        if split not in _SPLIT_ALIASES:
            raise DataError(f"split must be one of {sorted(_SPLIT_ALIASES)}, got {split!r}")
        self.root, self.split, self.transforms = Path(root), _SPLIT_ALIASES[split], transforms
        img_dir, ann_dir = self.root / "images" / self.split, self.root / "annotations" / self.split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise DataError(
                    f"{d}: not a directory (expected {self.root}/{{images,annotations}}/{self.split}/)"
                )
        images = sorted(
            p for p in img_dir.iterdir() if p.suffix.lower() in SEG_IMAGE_EXTENSIONS and p.is_file()
        )
        if not images:
            raise DataError(f"{img_dir}: no images with extensions {SEG_IMAGE_EXTENSIONS}")
        missing = [p.name for p in images if not (ann_dir / f"{p.stem}.png").is_file()]
        if missing:
            raise DataError(
                f"{ann_dir}: no label map <stem>.png for {len(missing)} image(s), e.g. {missing[:3]}"
            )
        self.samples = [(p, ann_dir / f"{p.stem}.png") for p in images]
        self.classes = _read_classes(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        img_path, ann_path = self.samples[i]
        with Image.open(img_path) as im:
            img = im.convert("RGB")
        with Image.open(ann_path) as lm:
            if lm.mode not in ("L", "P"):
                raise DataError(
                    f"{ann_path}: label map must be a single-channel 'L' or 'P' PNG, got mode {lm.mode!r}"
                )
            label = np.array(lm, dtype=np.uint8)  # "P": palette indices are the labels
        if label.shape != (img.height, img.width):
            raise DataError(
                f"{ann_path}: label map is {label.shape[1]}x{label.shape[0]} "
                f"but {img_path.name} is {img.width}x{img.height}"
            )
        return self.transforms(img, label) if self.transforms else (img, label)


class CocoInstances(Dataset):
    """COCO instances. Items: ``(PIL RGB image, target)`` with target

    ``boxes`` float32 [N, 4] xyxy (clipped to the image), ``labels`` int64 [N] in 1..K, ``masks`` uint8
    [N, H, W], ``image_id`` int, ``area`` float32 [N], ``iscrowd`` int64 [N]; torch tensors, as
    torchvision's detection models take them.

    Category ids are sorted and mapped to 1..K (``cat_ids[label - 1]`` maps back; ``classes[0]`` is
    "background"). Segmentations may be polygons, uncompressed or compressed RLE; an annotation without
    one gets an all-zero mask. Boxes narrower or shorter than 1 px are dropped. Crowd annotations are kept
    (``iscrowd`` says which) unless ``skip_crowd``. Images without annotations are kept, with empty targets.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        skip_crowd: bool = False,
        transforms: Callable[[Image.Image, dict[str, Any]], Any] | None = None,
    ) -> None:
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image directory not found")
        self.coco = load_coco(self.ann_file)
        self.skip_crowd, self.transforms = skip_crowd, transforms
        self.ids: list[int] = sorted(self.coco.getImgIds())
        self.cat_ids: list[int] = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.classes: list[str] = [
            "background",
            *(self.coco.cats[c].get("name", str(c)) for c in self.cat_ids),
        ]
        bad = {a["category_id"] for a in self.coco.dataset["annotations"]} - set(self.cat_ids)
        if bad:
            raise DataError(
                f"{self.ann_file}: annotations use category ids missing from 'categories': {sorted(bad)}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise DataError(f"{path}: image file not found (image id {image_id} in {self.ann_file})")
        with Image.open(path) as im:
            img = im.convert("RGB")
        expected = (info.get("width", img.width), info.get("height", img.height))
        if img.size != expected:
            raise DataError(
                f"{path}: image is {img.width}x{img.height} "
                f"but {self.ann_file} says {expected[0]}x{expected[1]}"
            )
        return img

    def load_target(self, image_id: int, width: int, height: int) -> dict[str, Any]:
        anns = self.coco.imgToAnns.get(image_id, [])
        if self.skip_crowd:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        boxes, labels, masks, areas, crowd = [], [], [], [], []
        for a in anns:
            x, y, w, h = (float(v) for v in a["bbox"])
            if w < 1 or h < 1:
                continue
            x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x1 <= x0 or y1 <= y0:  # entirely outside the image
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.cat_to_label[a["category_id"]])
            if a.get("segmentation"):
                masks.append(self.coco.annToMask(a).astype(np.uint8))
            else:
                masks.append(np.zeros((height, width), dtype=np.uint8))
            areas.append(float(a.get("area", w * h)))
            crowd.append(int(a.get("iscrowd", 0)))
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks))
            if masks
            else torch.zeros((0, height, width), dtype=torch.uint8),
            "image_id": int(image_id),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),
        }

    def __getitem__(self, i: int) -> Any:
        image_id = self.ids[i]
        img = self.load_image(image_id)
        target = self.load_target(image_id, img.width, img.height)
        return self.transforms(img, target) if self.transforms else (img, target)


def collate_detection(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Detection batches keep per-image sizes and instance counts: (list of images, list of targets)."""
    return [b[0] for b in batch], [b[1] for b in batch]
