"""Served detection post-processing (issue 14): class-agnostic NMS (numpy, torch-free) and the resize /
map-back of boxes and masks on canvases of odd sizes and aspect ratios."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service import dense
from service.bundle import ImageSpec
from service.imaging import Decoded, Limits, Preprocessor
from service.routers.detect import detect_one
from service.schemas import MaskFormat


def test_one_box_per_object_across_classes():
    # one garment answered twice (two classes, nearly the same box) plus a separate object
    boxes = np.array([[10, 10, 50, 60], [11, 9, 51, 61], [70, 70, 90, 95]], np.float32)
    scores = np.array([0.45, 0.37, 0.8], np.float32)
    keep = dense.agnostic_nms(boxes, scores, 0.5)
    assert keep.tolist() == [2, 0]
    sel = dense.select_detections(scores, 0.3, 100, boxes, 0.5)
    assert sel.tolist() == [2, 0]
    # without NMS (older bundles) nothing changes
    assert dense.select_detections(scores, 0.3, 100).tolist() == [2, 0, 1]
    # the score threshold applies before NMS: a suppressor below it suppresses nothing
    assert dense.select_detections(scores, 0.4, 100, boxes, 0.5).tolist() == [2, 0]
    assert dense.select_detections(np.array([0.2, 0.9], np.float32), 0.5, 100, boxes[:2], 0.5).tolist() == [1]


def test_iou_rule_is_strict_and_matches_torchvision():
    a = np.array([[0, 0, 10, 10], [0, 5, 10, 15]], np.float32)  # IoU = 50 / 150 = 1/3
    s = np.array([0.9, 0.8], np.float32)
    assert dense.agnostic_nms(a, s, 1 / 3 + 1e-6).tolist() == [0, 1]
    assert dense.agnostic_nms(a, s, 0.3).tolist() == [0]
    assert dense.agnostic_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []
    torch = pytest.importorskip("torch")
    from torchvision.ops import nms

    rng = np.random.default_rng(0)
    for _ in range(20):
        xy = rng.uniform(0, 80, (40, 2))
        wh = rng.uniform(2, 40, (40, 2))
        b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        sc = rng.permutation(40).astype(np.float32) / 40  # distinct scores: one order
        for t in (0.3, 0.5, 0.7):
            ref = nms(torch.from_numpy(b), torch.from_numpy(sc), t).numpy()
            assert dense.agnostic_nms(b, sc, t).tolist() == ref.tolist()


@pytest.mark.parametrize("width,height", [(173, 61), (29, 300), (511, 28), (96, 96), (1000, 999)])
def test_boxes_and_masks_map_back_to_odd_canvases(width, height):
    """A rectangle on a W x H canvas is stretched to the 96 px input; a detection that covers it exactly in
    input pixels maps back onto it in canvas pixels (box within a pixel, mask within a pixel's rim)."""
    s = 96
    spec = ImageSpec(
        size=s,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bicubic",
        patch_size=4,
        grid=(24, 24),
        num_patches=576,
        channels=3,
    )
    x0, y0, x1, y1 = int(0.2 * width), int(0.3 * height), int(0.7 * width), int(0.9 * height)
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[y0:y1, x0:x1] = 255
    pre = Preprocessor(spec, Limits(max_pixels=1 << 30, min_side=1))
    arr = pre.to_array(pre.resize(Image.fromarray(canvas)))
    assert arr.shape == (3, s, s)
    bright = arr[0] > 0  # (x - 0.5) / 0.25 > 0: brighter than mid grey, in input pixels
    ys, xs = np.nonzero(bright)
    box_in = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    outs = {
        "boxes": box_in,
        "labels": np.array([3]),
        "scores": np.array([0.9], np.float32),
        "masks": bright[None, None].astype(np.float32),
    }
    d = Decoded(arr, (width, height))
    res = detect_one(outs, d, ["bg", "a", "b", "c"], s, 0.5, 10, MaskFormat.rle, 0.5)
    assert res["width"] == width and res["height"] == height
    (det,) = res["detections"]
    tol_x, tol_y = width / s + 1, height / s + 1  # one input pixel, in canvas pixels
    for got, want, tol in zip(det["box"], (x0, y0, x1, y1), (tol_x, tol_y, tol_x, tol_y), strict=True):
        assert abs(got - want) <= tol
    counts = det["mask"]["counts"]
    flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)
    mask = flat.reshape(width, height).T  # column-major runs
    truth = canvas[:, :, 0] > 0
    assert (mask & truth).sum() / truth.sum() > 0.9 and (mask & ~truth).sum() / truth.sum() < 0.1
