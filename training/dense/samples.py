"""What the dense loop trains and validates on: per-sample views (task size, augmentation) of the sources."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..data import normalize, to_tensor
from .config import DenseDataSection

__all__ = ["Augment", "DetSamples", "SegSamples", "SegTransform", "limit_dataset", "mask_boxes"]


@dataclass(frozen=True)
class Augment:
    """The data section's crop/photometric options (see DenseDataSection)."""

    crop_prob: float = 0.0
    crop_min: float = 1.0
    photometric: float = 0.0

    @classmethod
    def of(cls, data: DenseDataSection) -> Augment:
        return cls(data.crop_prob, data.crop_min, data.photometric)

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) of a random crop, or None (no crop). Sides drawn independently: aspect jitter."""
        if self.crop_prob <= 0 or self.crop_min >= 1 or rng.random() >= self.crop_prob:
            return None
        cw = max(8, round(width * rng.uniform(self.crop_min, 1.0)))
        ch = max(8, round(height * rng.uniform(self.crop_min, 1.0)))
        x0, y0 = rng.randint(0, max(width - cw, 0)), rng.randint(0, max(height - ch, 0))
        return x0, y0, min(x0 + cw, width), min(y0 + ch, height)

    def jitter(self, x: Tensor, rng: random.Random) -> Tensor:
        """[0, 1] image -> brightness/contrast/gamma (and sometimes noise) jittered, still in [0, 1]."""
        if self.photometric <= 0 or rng.random() >= self.photometric:
            return x
        x = x.clamp(0, 1) ** rng.uniform(0.75, 1.33)
        x = (x - x.mean()) * rng.uniform(0.75, 1.25) + x.mean() + rng.uniform(-0.1, 0.1)
        if rng.random() < 0.3:  # sensor-like noise, seeded from the same stream
            g = torch.Generator().manual_seed(rng.getrandbits(31))
            x = x + torch.randn(x.shape[-2:], generator=g) * rng.uniform(0.0, 0.05)
        return x.clamp(0, 1)


class SegTransform:
    """A (PIL image, label map) pair -> (normalized tensor, label tensor) at the task size, augmented when
    training (crop and photometric jitter, then the flip)."""

    def __init__(
        self,
        size: int,
        mean: list[float],
        std: list[float],
        hflip: float,
        train: bool,
        augment: Augment | None = None,
    ) -> None:
        self.size, self.mean, self.std, self.hflip, self.train = size, mean, std, hflip, train
        self.augment = augment if train and augment else Augment()

    def __call__(self, img: Image.Image, label: np.ndarray, rng: random.Random) -> tuple[Tensor, Tensor]:
        box = self.augment.crop_box(img.width, img.height, rng)
        if box is not None:
            img, label = img.crop(box), label[box[1] : box[3], box[0] : box[2]]
        lab = Image.fromarray(label)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
            lab = lab.resize((self.size, self.size), Image.Resampling.NEAREST)
        x = normalize(self.augment.jitter(to_tensor(img), rng), self.mean, self.std)
        y = torch.from_numpy(np.array(lab, dtype=np.int64))
        if self.train and rng.random() < self.hflip:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


class SegSamples(Dataset):
    """A segmentation source through :class:`SegTransform`, seeded per (seed, epoch, index)."""

    def __init__(self, source: Dataset, transform: SegTransform, seed: int) -> None:
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img, label = self.source[i]
        return self.transform(img, label, random.Random(hash((self.seed, self.epoch, i))))


class DetSamples(Dataset):
    """A detection source at the task size (boxes and masks follow the crop, resize and flip)."""

    def __init__(
        self,
        source: Dataset,
        size: int,
        mean: list[float],
        std: list[float],
        hflip: float,
        train: bool,
        seed: int,
        augment: Augment | None = None,
    ) -> None:
        self.source, self.size, self.mean, self.std = source, size, mean, std
        self.hflip, self.train, self.seed, self.epoch = hflip, train, seed, 0
        self.augment = augment if train and augment else Augment()

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        img, t = self.source[i]
        w, h = img.size
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
        masks = torch.as_tensor(np.asarray(t["masks"]), dtype=torch.uint8).reshape(-1, h, w)
        labels = torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1)
        rng = random.Random(hash((self.seed, self.epoch, i, 7919)))  # ints only: hash() is stable across runs
        box = self.augment.crop_box(w, h, rng)
        if box is not None:
            cm = masks[:, box[1] : box[3], box[0] : box[2]]
            keep = cm.flatten(1).sum(1) >= 8  # objects (nearly) cut away leave the target
            if bool(keep.any()):  # a crop without any object is not taken
                img, masks, labels = img.crop(box), cm[keep], labels[keep]
                boxes = mask_boxes(masks)
                w, h = img.size
        if (w, h) != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
            boxes = boxes * torch.tensor([self.size / w, self.size / h] * 2)
            masks = torch.nn.functional.interpolate(
                masks[None].float(), size=(self.size, self.size), mode="nearest"
            )[0]
            masks = masks.to(torch.uint8)
        x = normalize(self.augment.jitter(to_tensor(img), rng), self.mean, self.std)
        if self.train and random.Random(hash((self.seed, self.epoch, i))).random() < self.hflip:
            x, masks = x.flip(-1), masks.flip(-1)
            boxes = torch.stack(
                [self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], dim=1
            )
        target = {
            "boxes": boxes,
            "labels": labels,
            "masks": masks,
            "image_id": torch.tensor(int(t["image_id"])),
        }
        return x, target


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes [N, 4] of non-empty masks [N, H, W] (x2 = last column + 1, as the COCO boxes)."""
    m = masks.bool()
    rows, cols = m.any(2), m.any(1)
    idx_r = torch.arange(masks.shape[1]).expand_as(rows)
    idx_c = torch.arange(masks.shape[2]).expand_as(cols)
    y0 = torch.where(rows, idx_r, masks.shape[1]).min(1).values
    y1 = torch.where(rows, idx_r, -1).max(1).values + 1
    x0 = torch.where(cols, idx_c, masks.shape[2]).min(1).values
    x1 = torch.where(cols, idx_c, -1).max(1).values + 1
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def limit_dataset(ds: Dataset, n: int | None) -> Dataset:
    """The first ``n`` samples (all when ``n`` is None)."""
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    return Subset(ds, list(range(n)))
