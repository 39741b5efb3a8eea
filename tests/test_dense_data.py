"""Dense-task data: the Fashion-MNIST scenes generator, the segmentation/COCO loaders and the metrics.

Everything runs on a tiny fake Fashion-MNIST written here: train garments are dim (intensity 100-140,
classes 0-4) and test garments bright (200-240, classes 5-9), so the outputs show which split each scene
drew from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tests.helpers import TEST_CLASSES, TRAIN_CLASSES, file_tree, load_png, make_fake_fmnist, write_idx
from training.data import FMNIST_CLASSES, DataError
from training.dense import scenes as S
from training.dense.datasets import CocoInstances, SegmentationFolder, collate_detection
from training.dense.metrics import SegmentationMeter, coco_evaluate, masks_to_rle

# pycocotools' Cython decode trips a NumPy 2 deprecation about __array__(copy=...); not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

SCENE_ARGS = dict(n_train=6, n_test=4, size=48, min_objects=2, max_objects=4, seed=3)


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> Path:
    return make_fake_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, fake_fmnist) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scenes")
    return out, S.generate_scenes(out, fmnist_root=fake_fmnist, **SCENE_ARGS)


# ---------------------------------------------------------------------------------------------- generator
def test_generator_is_deterministic_and_cli_matches(scenes, fake_fmnist, tmp_path):
    out, summary = scenes
    again = tmp_path / "again"
    a = SCENE_ARGS
    summary2 = S.main(
        [str(again), "--train", str(a["n_train"]), "--test", str(a["n_test"]), "--size", str(a["size"]),
         "--seed", str(a["seed"]), "--fmnist-root", str(fake_fmnist)]
    )  # fmt: skip
    first, second = file_tree(out), file_tree(again)
    assert sorted(first) == sorted(second) and len(first) == 2 * (6 + 4) + 2 + 1
    assert all(first[k] == second[k] for k in first), "same arguments must give byte-identical files"
    assert {k: v for k, v in summary2.items() if k != "out_dir"} == {
        k: v for k, v in summary.items() if k != "out_dir"
    }

    other = tmp_path / "other_seed"
    S.generate_scenes(other, fmnist_root=fake_fmnist, **{**SCENE_ARGS, "seed": 4})
    assert (
        file_tree(other)["ade/annotations/training/scene_train_000000.png"]
        != first["ade/annotations/training/scene_train_000000.png"]
    )

    with pytest.raises(FileExistsError, match="overwrite"):
        S.generate_scenes(again, fmnist_root=fake_fmnist, **SCENE_ARGS)
    S.generate_scenes(again, fmnist_root=fake_fmnist, overwrite=True, **SCENE_ARGS)
    assert file_tree(again) == first


def test_layout_summary_and_split_separation(scenes):
    out, summary = scenes
    on_disk = json.loads((out / "scenes.json").read_text())
    assert on_disk == {k: v for k, v in summary.items() if k != "out_dir"}
    assert on_disk["classes"] == list(FMNIST_CLASSES) and on_disk["segmentation_classes"][0] == "background"
    assert on_disk["args"]["size"] == 48 and on_disk["args"]["seed"] == 3

    for split, folder, classes, n in (
        ("train", "training", TRAIN_CLASSES, 6),
        ("test", "validation", TEST_CLASSES, 4),
    ):
        s = summary["splits"][split]
        assert s["images"] == n and (out / s["image_dir"]).is_dir() and (out / s["coco"]).is_file()
        assert sum(s["class_histogram"]) == s["objects"] >= 2 * n
        assert all(c in classes for c, count in enumerate(s["class_histogram"]) if count)
        for img_path in sorted((out / "ade" / "images" / folder).glob("*.png")):
            with Image.open(img_path) as im:
                assert im.mode == "RGB" and im.size == (48, 48)
                img = np.array(im)
            with Image.open(out / "ade" / "annotations" / folder / img_path.name) as lm:
                assert lm.mode == "L"
                label = np.array(lm)
            assert (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all()
            # Only mask pixels are drawn: every lit pixel is labelled, and nothing else is.
            assert ((img[..., 0] > 0) == (label > 0)).all()
            assert set(np.unique(label).tolist()) - {0} <= {c + 1 for c in classes}
            # Dim train garments, bright test garments: each split drew only from its own source split.
            if split == "train":
                assert img.max() <= 140
            else:
                assert img.max() >= 200


def test_label_maps_agree_with_coco_masks_and_boxes(scenes):
    out, _ = scenes
    for folder, ann_name in (("training", "instances_train.json"), ("validation", "instances_val.json")):
        coco = json.loads((out / "coco" / "annotations" / ann_name).read_text())
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert [c["name"] for c in coco["categories"]] == list(FMNIST_CLASSES)
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for info in coco["images"]:
            label = load_png(out / "ade" / "annotations" / folder / info["file_name"])
            assert (out / "ade" / "images" / folder / info["file_name"]).is_file()
            anns = by_image[info["id"]]
            assert 2 <= len(anns) <= 4
            masks = []
            for a in anns:
                assert a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str)
                m = mask_utils.decode(a["segmentation"]).astype(bool)
                assert m.shape == (info["height"], info["width"]) == (48, 48)
                assert a["area"] == m.sum() >= S.MIN_VISIBLE_PIXELS
                ys, xs = np.nonzero(m)
                x0, y0 = xs.min(), ys.min()
                assert a["bbox"] == [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
                assert all(isinstance(v, float) for v in a["bbox"])
                masks.append(m)
            stack = np.stack(masks)
            assert stack.sum(0).max() == 1, "visible masks of one scene must not overlap"
            for k in range(10):
                union = np.zeros_like(label, dtype=bool)
                for a, m in zip(anns, masks, strict=True):
                    if a["category_id"] == k + 1:
                        union |= m
                assert (union == (label == k + 1)).all()


# ---------------------------------------------------------------------------------------------- loaders
def test_segmentation_folder_reads_the_scenes(scenes):
    out, summary = scenes
    train = SegmentationFolder(out / "ade", "training")
    assert len(train) == 6 and len(SegmentationFolder(out / "ade", "train")) == 6
    val = SegmentationFolder(out / "ade", "val")
    assert len(val) == 4 and val.split == "validation" and len(SegmentationFolder(out / "ade", "test")) == 4
    assert train.classes == ["background", *FMNIST_CLASSES]
    img, label = val[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (48, 48)
    assert label.dtype == np.uint8 and label.shape == (48, 48)
    assert np.array_equal(
        label, load_png(out / "ade" / "annotations" / "validation" / "scene_test_000000.png")
    )
    seen = SegmentationFolder(
        out / "ade", "training", transforms=lambda i, m: (np.asarray(i).shape, int(m.max()))
    )[0]
    assert seen[0] == (48, 48, 3) and 1 <= seen[1] <= 5


def test_coco_instances_reads_the_scenes(scenes):
    out, _ = scenes
    ds = CocoInstances(
        out / "ade" / "images" / "validation", out / "coco" / "annotations" / "instances_val.json"
    )
    assert len(ds) == 4 and ds.cat_ids == list(range(1, 11)) and ds.classes == ["background", *FMNIST_CLASSES]
    label_map = load_png(out / "ade" / "annotations" / "validation" / "scene_test_000000.png")
    img, t = ds[0]
    assert img.mode == "RGB" and img.size == (48, 48) and t["image_id"] == 1
    n = len(t["labels"])
    assert 2 <= n <= 4
    assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (n, 4)
    assert (
        t["labels"].dtype == torch.int64
        and t["masks"].dtype == torch.uint8
        and t["masks"].shape == (n, 48, 48)
    )
    assert t["area"].dtype == torch.float32 and t["iscrowd"].tolist() == [0] * n
    for box, lab, m, area in zip(t["boxes"], t["labels"], t["masks"].numpy(), t["area"], strict=True):
        ys, xs = np.nonzero(m)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # xyxy, exclusive max
        assert float(area) == m.sum() and (label_map[m == 1] == int(lab)).all()  # ids 1..10 map to 1..10 here
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == 2


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def test_coco_instances_polygon_rle_crowd_and_tiny_boxes(tmp_path):
    h, w = 16, 20
    Image.fromarray(np.full((h, w, 3), 50, np.uint8)).save(tmp_path / "a.png")
    blob = np.zeros((h, w), np.uint8)
    blob[4:12, 11:18] = 1
    blob[6, 13] = 0
    crowd = np.zeros((h, w), np.uint8)
    crowd[0:3, 0:20] = 1
    compressed = masks_to_rle(crowd[None])[0]
    anns = [
        {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 2, 8, 6], "area": 48, "iscrowd": 0,
         "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]]},
        {"id": 2, "image_id": 5, "category_id": 3, "bbox": [11, 4, 7, 8], "area": 55, "iscrowd": 0,
         "segmentation": _uncompressed_rle(blob)},
        {"id": 3, "image_id": 5, "category_id": 7, "bbox": [0, 0, 20, 3], "area": 60, "iscrowd": 1,
         "segmentation": compressed},
        {"id": 4, "image_id": 5, "category_id": 3, "bbox": [5, 5, 0.5, 4], "area": 2, "iscrowd": 0,
         "segmentation": [[5, 5, 5.5, 5, 5.5, 9, 5, 9]]},
    ]  # fmt: skip
    coco = {
        "images": [{"id": 5, "file_name": "a.png", "width": w, "height": h}],
        "annotations": anns,
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    ann_file = tmp_path / "inst.json"
    ann_file.write_text(json.dumps(coco))

    ds = CocoInstances(tmp_path, ann_file)
    assert ds.cat_ids == [3, 7] and ds.classes == ["background", "three", "seven"]
    _, t = ds[0]
    assert t["image_id"] == 5 and t["labels"].tolist() == [2, 1, 2]  # the 0.5 px wide box is dropped
    assert t["boxes"].tolist() == [[2, 2, 10, 8], [11, 4, 18, 12], [0, 0, 20, 3]]
    assert t["iscrowd"].tolist() == [0, 0, 1] and t["area"].tolist() == [48, 55, 60]
    masks = t["masks"].numpy()
    assert masks[0, 3:8, 3:10].all() and not masks[0, 10:].any()  # the polygon rasterised in place
    assert np.array_equal(masks[1], blob) and np.array_equal(masks[2], crowd)

    _, t2 = CocoInstances(tmp_path, ann_file, skip_crowd=True)[0]
    assert t2["iscrowd"].tolist() == [0, 0] and t2["labels"].tolist() == [2, 1]


# ---------------------------------------------------------------------------------------------- errors
def test_data_errors(tmp_path, fake_fmnist, scenes):
    out, _ = scenes
    with pytest.raises(DataError, match="not a directory"):
        SegmentationFolder(tmp_path / "nope", "training")
    with pytest.raises(DataError, match="split must be"):
        SegmentationFolder(out / "ade", "dev")

    seg = tmp_path / "seg"
    (seg / "images" / "training").mkdir(parents=True)
    (seg / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        SegmentationFolder(seg, "training")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(seg / "images" / "training" / "x.jpg")
    with pytest.raises(DataError, match=r"no label map.*x\.jpg"):
        SegmentationFolder(seg, "training")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(seg / "annotations" / "training" / "x.png")
    ds = SegmentationFolder(seg, "training")
    assert ds.classes is None
    with pytest.raises(DataError, match=r"x\.png: label map is 8x8 but x\.jpg is 10x8"):
        ds[0]
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(seg / "annotations" / "training" / "x.png")
    with pytest.raises(DataError, match="single-channel"):
        ds[0]
    (seg / "classes.json").write_text('{"classes": ["background", 3]}')
    with pytest.raises(DataError, match="classes.json: expected a list of class names"):
        SegmentationFolder(seg, "training")
    (seg / "classes.json").write_text('["background", "thing"]')
    assert SegmentationFolder(seg, "training").classes == ["background", "thing"]

    img_dir = out / "ade" / "images" / "validation"
    with pytest.raises(DataError, match="missing.json: COCO annotation file not found"):
        CocoInstances(img_dir, tmp_path / "missing.json")
    (tmp_path / "corrupt.json").write_text('{"images": [')
    with pytest.raises(DataError, match="corrupt.json: not valid JSON"):
        CocoInstances(img_dir, tmp_path / "corrupt.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="list.json: not a COCO instances file"):
        CocoInstances(img_dir, tmp_path / "list.json")
    ds = CocoInstances(tmp_path, out / "coco" / "annotations" / "instances_val.json")  # wrong image root
    with pytest.raises(DataError, match=r"scene_test_000000\.png: image file not found"):
        ds[0]

    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        S.generate_scenes(tmp_path / "g1", fmnist_root=tmp_path / "no_fmnist", **SCENE_ARGS)
    bad = make_fake_fmnist(tmp_path / "bad_fmnist")
    write_idx(bad / "train-labels-idx1-ubyte.gz", np.full(12, 11, np.uint8))
    with pytest.raises(DataError, match="labels outside"):
        S.generate_scenes(tmp_path / "g2", fmnist_root=bad, **SCENE_ARGS)


# ---------------------------------------------------------------------------------------------- metrics
def test_segmentation_meter_hand_computed():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    # Confusion (rows gt, cols pred), the ignored pixel left out: [[1, 1, 0], [0, 2, 0], [1, 0, 0]].
    # IoU = 1/3, 2/3, 0 -> mIoU 33.33; pixel acc 3/5; per-class acc 1/2, 1, 0 -> mean 50.
    m = SegmentationMeter(3)
    m.update(pred, target)
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    r = m.compute()
    assert r == {"mIoU": 33.33, "pixel_acc": 60.0, "mean_acc": 50.0, "per_class_iou": [33.33, 66.67, 0.0]}

    # A class absent from gt and prediction is None and left out of the mean; torch batches work too.
    m4 = SegmentationMeter(4)
    m4.update(torch.from_numpy(np.stack([pred, pred])), torch.from_numpy(np.stack([target, target])))
    r4 = m4.compute()
    assert (
        r4["per_class_iou"] == [33.33, 66.67, 0.0, None] and r4["mIoU"] == 33.33 and r4["pixel_acc"] == 60.0
    )
    m4.reset()
    assert m4.compute()["mIoU"] == 0.0 and m4.compute()["per_class_iou"] == [None] * 4

    with pytest.raises(ValueError, match="same shape|both be"):
        m.update(pred, target[:1])
    with pytest.raises(ValueError, match="outside"):
        m.update(np.array([[3]]), np.array([[0]]))
    with pytest.raises(ValueError, match="integer"):
        m.update(pred.astype(float), target)


def test_coco_evaluate_perfect_and_empty(scenes):
    out, _ = scenes
    ann_file = out / "coco" / "annotations" / "instances_val.json"
    gt = json.loads(ann_file.read_text())
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
         "segmentation": a["segmentation"]}
        for a in gt["annotations"]
    ]  # fmt: skip
    r = coco_evaluate(ann_file, perfect)
    assert r == {
        k: 100.0 for k in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "segm_mAP_75")
    }
    assert perfect[0].keys() == {
        "image_id",
        "category_id",
        "bbox",
        "score",
        "segmentation",
    }  # inputs untouched

    boxes_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in perfect]
    coco = COCO(str(ann_file))
    assert coco_evaluate(coco, boxes_only) == {"bbox_mAP": 100.0, "bbox_mAP_50": 100.0, "bbox_mAP_75": 100.0}

    wrong_class = [{**d, "category_id": d["category_id"] % 10 + 1} for d in perfect]
    assert coco_evaluate(coco, wrong_class)["segm_mAP"] == 0.0

    empty = coco_evaluate(coco, [])
    assert empty == {k: 0.0 for k in r}
    assert coco_evaluate(coco, [], iou_types=("bbox",)) == {
        "bbox_mAP": 0.0,
        "bbox_mAP_50": 0.0,
        "bbox_mAP_75": 0.0,
    }
    with pytest.raises(ValueError, match="image ids"):
        coco_evaluate(coco, [{**perfect[0], "image_id": 999}])
    with pytest.raises(ValueError, match="compressed RLE"):
        coco_evaluate(coco, [{**perfect[0], "segmentation": [[0, 0, 4, 0, 4, 4]]}])


def test_masks_to_rle_round_trip():
    masks = np.zeros((2, 5, 7), np.uint8)
    masks[0, 1:3, 2:6] = 1
    masks[1, 4, :] = 1
    rles = masks_to_rle(torch.from_numpy(masks))
    assert json.loads(json.dumps(rles)) == rles and rles[0]["size"] == [5, 7]
    assert np.array_equal(mask_utils.decode(rles).transpose(2, 0, 1), masks)
    assert masks_to_rle(np.zeros((0, 5, 7), np.uint8)) == []
