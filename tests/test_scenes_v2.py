"""The varied scene presets (issue 14): determinism, real variation, masks that stay right on non-black
backgrounds, and a shifted preset that lies outside the v2 ranges. Fake Fashion-MNIST
(tests/helpers.make_fake_fmnist)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from tests.helpers import file_tree, load_png, make_fake_fmnist
from training.dense import scenes as S

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> Path:
    return make_fake_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=30, n_test=20)


@pytest.fixture(scope="module")
def v2(tmp_path_factory, fake_fmnist) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("v2")
    return out, S.generate_scenes(out, n_train=40, n_test=6, seed=1, fmnist_root=fake_fmnist, preset="v2")


def test_v2_is_deterministic_and_cli_matches(v2, fake_fmnist, tmp_path):
    out, _ = v2
    S.main(
        [
            str(tmp_path),
            "--train",
            "40",
            "--test",
            "6",
            "--seed",
            "1",
            "--preset",
            "v2",
            "--fmnist-root",
            str(fake_fmnist),
        ]
    )
    assert file_tree(out) == file_tree(tmp_path)


def test_v2_varies_canvas_background_scale_and_count(v2):
    out, summary = v2
    assert summary["scene_version"] == "v2" and summary["settings"]["name"] == "v2"
    coco = COCO()
    coco.dataset = json.loads((out / "coco/annotations/instances_train.json").read_text())
    coco.createIndex()
    sizes = {(im["width"], im["height"]) for im in coco.dataset["images"]}
    assert len(sizes) > 20 and any(w != h for w, h in sizes)
    assert min(min(s) for s in sizes) < 100 and max(max(s) for s in sizes) > 150
    counts = [len(coco.imgToAnns.get(i, [])) for i in coco.getImgIds()]
    assert min(counts) == 1 and max(counts) >= 5
    # background: the median pixel of the label-0 area, per scene -> black and non-black scenes both occur
    levels, texture = [], []
    for im in coco.dataset["images"]:
        img = load_png(out / "ade/images/training" / im["file_name"])[:, :, 0]
        lab = load_png(out / "ade/annotations/training" / im["file_name"])
        levels.append(float(np.median(img[lab == 0])))
        texture.append(float(img[lab == 0].std()))
    assert min(levels) < 8 and max(levels) > 40
    assert max(texture) > 5  # noise / gradients / textures, not only flat fills
    # garment scale: the longer box side over the shorter canvas side spans small and large
    rel = [
        max(a["bbox"][2:]) / min(coco.imgs[a["image_id"]]["width"], coco.imgs[a["image_id"]]["height"])
        for a in coco.dataset["annotations"]
    ]
    assert min(rel) < 0.15 and max(rel) > 0.45


def test_masks_are_the_garment_pixels_on_a_grey_background(fake_fmnist):
    """No jitter, a flat grey background: inside each mask the canvas is the resized garment, outside it is
    the background level exactly; thresholding the canvas would have labelled every pixel a garment."""
    from training.data import FashionMNIST

    ds = FashionMNIST(fake_fmnist, split="test")
    st = S.SceneSettings(
        name="t",
        code=9,
        scale=((0.3, 0.5),),
        objects=(3, 3),
        disjoint_prob=1.0,
        backgrounds=(("flat", 1.0),),
        level=((0.4, 0.4),),
    )
    rng = np.random.default_rng(0)
    canvas, objects = S.compose_varied(ds.images, ds.labels, 90, 130, 3, st, rng)
    assert canvas.shape == (90, 130) and len(objects) >= 2
    union = np.zeros(canvas.shape, bool)
    for o in objects:
        assert not (union & o.mask).any()  # disjoint scene
        union |= o.mask
        assert int(o.mask.sum()) == o.full_area
    bg = round(0.4 * 255)
    assert (canvas[~union] == bg).all()
    assert (canvas > S.MASK_THRESHOLD).all()  # a canvas threshold would be useless here
    assert (np.abs(canvas[union].astype(int) - bg) > 0).mean() > 0.9  # the garments' own pixels


def test_written_masks_agree_with_label_maps_on_non_black_scenes(v2):
    out, _ = v2
    coco = COCO()
    coco.dataset = json.loads((out / "coco/annotations/instances_val.json").read_text())
    coco.createIndex()
    grey = 0
    for im in coco.dataset["images"]:
        lab = load_png(out / "ade/annotations/validation" / im["file_name"])
        img = load_png(out / "ade/images/validation" / im["file_name"])
        assert lab.shape == (im["height"], im["width"]) == img.shape[:2]
        grey += float(np.median(img[lab == 0])) > 8
        rebuilt = np.zeros_like(lab)
        for a in coco.imgToAnns[im["id"]]:
            m = coco.annToMask(a).astype(bool)
            assert not (rebuilt[m] > 0).any()  # visible masks never overlap
            rebuilt[m] = a["category_id"]
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [
                float(xs.min()),
                float(ys.min()),
                float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1),
            ]
        assert (rebuilt == lab).all()
    assert grey >= 1


def test_shifted_lies_outside_the_v2_ranges(fake_fmnist, tmp_path):
    v2, sh = S.PRESETS["v2"], S.PRESETS["shifted"]

    def outside(bands, ref):
        lo, hi = ref[0]
        return all(b_hi <= lo or b_lo >= hi for b_lo, b_hi in bands)

    assert outside(sh.side, v2.side) and outside(sh.scale, v2.scale) and outside(sh.level, v2.level)
    assert outside(sh.noise, v2.noise) and outside(sh.aspect, v2.aspect)
    assert "checker" not in dict(v2.backgrounds)
    summary = S.generate_scenes(tmp_path, n_train=0, n_test=4, fmnist_root=fake_fmnist, preset="shifted")
    assert summary["splits"]["train"]["images"] == 0 and summary["scene_version"] == "shifted"
    coco = json.loads((tmp_path / "coco/annotations/instances_val.json").read_text())
    for im in coco["images"]:
        assert (im["width"] * im["height"]) ** 0.5 >= 280 and not 0.74 < im["width"] / im["height"] < 1.34
        with Image.open(tmp_path / "ade/images/validation" / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])


def test_v1_defaults_unchanged(fake_fmnist, tmp_path):
    summary = S.generate_scenes(tmp_path, n_train=2, n_test=1, fmnist_root=fake_fmnist)
    assert summary["args"]["size"] == 64 and summary["scene_version"] == "v1"
    assert summary["args"]["min_objects"] == 2 and summary["args"]["max_objects"] == 4
    with pytest.raises(ValueError, match="unknown scene preset"):
        S.generate_scenes(tmp_path / "x", n_train=1, n_test=1, fmnist_root=fake_fmnist, preset="nope")
