"""Training-time augmentation of the dense heads (issue 14): the crop keeps boxes equal to the tight boxes of
the cropped masks and label maps aligned with the image; the photometric jitter stays in [0, 1]; both off
by default (the v1 presets draw no extra random numbers)."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from training.dense.samples import Augment, mask_boxes
from training.dense.samples import DetSamples as _DetData
from training.dense.samples import SegTransform as _SegTransform


class _Source:
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.items = []
        for _ in range(4):
            h, w = 70, 110
            img = np.full((h, w, 3), 40, np.uint8)
            masks = np.zeros((3, h, w), np.uint8)
            for k in range(3):
                y, x = rng.integers(0, h - 20), rng.integers(0, w - 30)
                masks[k, y : y + 20, x : x + 30] = 1
                img[masks[k] > 0] = 200
            boxes = [
                [
                    float(np.nonzero(m.any(0))[0].min()),
                    float(np.nonzero(m.any(1))[0].min()),
                    float(np.nonzero(m.any(0))[0].max() + 1),
                    float(np.nonzero(m.any(1))[0].max() + 1),
                ]
                for m in masks
            ]
            self.items.append(
                (Image.fromarray(img), {"boxes": boxes, "masks": masks, "labels": [1, 2, 3], "image_id": 1})
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_mask_boxes_are_tight():
    m = torch.zeros(2, 10, 12, dtype=torch.uint8)
    m[0, 2:5, 3:9] = 1
    m[1, 0, 0] = 1
    assert mask_boxes(m).tolist() == [[3.0, 2.0, 9.0, 5.0], [0.0, 0.0, 1.0, 1.0]]


def test_detection_crop_keeps_boxes_on_masks_and_jitter_in_range():
    aug = Augment(crop_prob=1.0, crop_min=0.6, photometric=1.0)
    ds = _DetData(_Source(), 96, [0.0] * 3, [1.0] * 3, 0.0, True, seed=0, augment=aug)
    for epoch in range(3):
        ds.epoch = epoch
        for i in range(len(ds)):
            x, t = ds[i]
            assert x.shape == (3, 96, 96) and float(x.min()) >= 0 and float(x.max()) <= 1
            assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) >= 1
            # boxes scale continuously, masks by nearest: equal within one source pixel (<= 96 / 42 px)
            assert torch.allclose(t["boxes"], mask_boxes(t["masks"]), atol=2.5)
    x1, t1 = ds[0]
    x2, t2 = ds[0]
    assert torch.equal(x1, x2) and torch.equal(t1["boxes"], t2["boxes"])  # seeded by (seed, epoch, index)
    plain = _DetData(_Source(), 96, [0.0] * 3, [1.0] * 3, 0.0, True, seed=0)
    assert plain.augment == Augment()


def test_segmentation_crop_keeps_labels_aligned():
    img = np.zeros((60, 90, 3), np.uint8)
    lab = np.zeros((60, 90), np.uint8)
    img[10:40, 20:70] = 255
    lab[10:40, 20:70] = 4
    tf = _SegTransform(48, [0.0] * 3, [1.0] * 3, 0.0, True, Augment(crop_prob=1.0, crop_min=0.6))
    for seed in range(5):
        x, y = tf(Image.fromarray(img), lab, random.Random(seed))
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        bright, fg = x[0] > 0.5, y == 4
        assert (bright == fg).float().mean() > 0.97
