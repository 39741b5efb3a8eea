"""Fashion-MNIST scenes: a small, seeded segmentation/detection benchmark made of Fashion-MNIST garments.

Each scene is a black ``size x size`` canvas with ``min_objects..max_objects`` garments pasted at random
positions, each rescaled (bilinear) to a random side in ``[0.3, 0.6] * size``; later garments are drawn on
top of earlier ones. Train scenes use only the Fashion-MNIST train split and test scenes only the test
split, so no test garment is ever seen in training.

Rules (the constants below):

* **Interpolation**: bilinear (PIL, antialiased when shrinking). Bicubic's overshoot draws faint halos and
  ringing around the high-contrast garment edges, which the threshold below would turn into speckles in the
  masks; bilinear keeps a garment's support compact.
* **Mask**: a garment's pixels are those above ``MASK_THRESHOLD`` (10 of 255) after resizing; Fashion-MNIST
  backgrounds are 0, so this only trims the faint interpolated rim (and, rarely, very dark garment parts).
  Only mask pixels are drawn, so every non-zero image pixel belongs to exactly one visible object.
* **Occlusion**: an object's mask is its garment mask minus what later objects cover; its box is the tight
  box of that visible mask. A placement is resampled (new garment, size and position; up to
  ``PLACEMENT_TRIES`` times) if it would leave an earlier object less than ``MIN_VISIBLE_FRACTION`` (40%) of
  its own mask or fewer than ``MIN_VISIBLE_PIXELS`` pixels; if no placement works the object is dropped, and
  a scene that ends with fewer than ``min_objects`` objects is drawn again.
* **Determinism**: scene ``i`` of a split is drawn from ``np.random.default_rng([seed, split, i])`` (split 0 =
  train, 1 = test), so the same arguments give byte-identical files, and a smaller set is a prefix of a
  larger one.

Layout under ``out_dir``::

    ade/images/{training,validation}/scene_<split>_<i>.png       RGB (gray replicated)
    ade/annotations/{training,validation}/scene_<split>_<i>.png  "L" label maps: 0 background, k+1
                                                                 Fashion-MNIST class k, 255 ignore
    coco/annotations/instances_{train,val}.json                  COCO instances (RLE masks, xywh boxes)
    scenes.json                                                  arguments, class names, counts

The COCO files reference the same images: their image root is ``out_dir/ade/images/training`` (train) or
``out_dir/ade/images/validation`` (val), and ``file_name`` is relative to that folder.

Presets (``--preset``, :data:`PRESETS`): ``v1`` is the scene above (the default, byte-identical to what it
always wrote). ``v2`` adds real variation: canvases of 48-256 px (geometric mean of the sides) with aspect
ratios 0.75-1.33, garments of 0.1-0.67 of the *shorter* canvas side (log-uniform; at least 8 px), 1-6
objects of which half the scenes keep the masks disjoint and half allow occlusion (the 40% rule above),
backgrounds black / flat grey / noise / smooth gradients / low-contrast textures (stripes, blobs), a
per-garment contrast and gamma jitter and a global brightness/contrast/gamma jitter. ``shifted`` draws its
settings *outside* the v2 ranges (brighter backgrounds, stronger noise, a checkerboard texture v2 never
shows, garments of 0.06-0.1 or 0.67-0.8 of the side, canvases of 288-512 px with aspect ratios 0.5-0.75 or
1.33-2): a held-out distribution-shift test, written by the same code (``--preset shifted --train 0``).

With a non-black background the **mask is still the garment's own pixels** (> ``MASK_THRESHOLD`` after
resizing, before any jitter or compositing), never a threshold on the canvas: the garment's mask pixels
replace the background, the rest of the canvas is background, and the jitters do not move any pixel.
Non-v1 presets add a preset code to the seed (``[seed, split, i, code]``), so their scenes do not repeat
v1's garment choices. ``--size S`` fixes a square S x S canvas for any preset (v1 default 64).

CLI: ``python -m training.dense.scenes OUT --train N --test M --size 64 --seed 0 [--preset v2|shifted]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data import FMNIST_CLASSES, FMNIST_DIR, DataError, FashionMNIST
from .cli import add_scenes_arguments
from .metrics import masks_to_rle

_logger = logging.getLogger(__name__)

MASK_THRESHOLD = 10  # garment pixel > this (uint8) belongs to the mask
SCALE_RANGE = (0.3, 0.6)  # garment side as a fraction of the canvas side
MIN_VISIBLE_FRACTION = 0.4  # an occluded object keeps at least this much of its own mask ...
MIN_VISIBLE_PIXELS = 20  # ... and at least this many pixels
PLACEMENT_TRIES = 30
SCENE_TRIES = 100
IGNORE_INDEX = 255  # reserved in the label maps, never written by the generator
RESAMPLE = Image.Resampling.BILINEAR

# split -> (ADE20K folder, COCO annotation file, seed component)
SPLITS: dict[str, tuple[str, str, int]] = {
    "train": ("training", "instances_train.json", 0),
    "test": ("validation", "instances_val.json", 1),
}


@dataclass
class SceneObject:
    """One garment in a composed scene."""

    source_index: int  # index into the Fashion-MNIST split
    label: int  # Fashion-MNIST class 0..9
    mask: np.ndarray  # bool [size, size], the visible pixels
    full_area: int  # mask pixels before occlusion


def _sample_placement(images: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """A random garment, rescaled and placed on an empty canvas: (source index, uint8 [size, size])."""
    j = int(rng.integers(len(images)))
    side = max(2, int(round(rng.uniform(*SCALE_RANGE) * size)))
    y0 = int(rng.integers(0, size - side + 1))
    x0 = int(rng.integers(0, size - side + 1))
    garment = np.asarray(Image.fromarray(images[j]).resize((side, side), RESAMPLE))
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[y0 : y0 + side, x0 : x0 + side] = garment
    return j, pixels


def compose_scene(
    images: np.ndarray, labels: np.ndarray, size: int, n_objects: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[SceneObject]]:
    """Paste up to ``n_objects`` garments (fewer if some cannot be placed): (uint8 canvas, objects)."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int64)  # index of the object that shows at each pixel
    sources: list[int] = []
    full_areas: list[int] = []
    for _ in range(n_objects):
        for _try in range(PLACEMENT_TRIES):
            j, pixels = _sample_placement(images, size, rng)
            mask = pixels > MASK_THRESHOLD
            area = int(mask.sum())
            if area < MIN_VISIBLE_PIXELS:
                continue
            # What each earlier object would still show once this one is drawn on top.
            kept = np.bincount(owner[~mask] + 1, minlength=len(sources) + 1)[1:]
            if all(
                k >= max(MIN_VISIBLE_FRACTION * a, MIN_VISIBLE_PIXELS)
                for k, a in zip(kept, full_areas, strict=True)
            ):
                break
        else:
            continue  # no acceptable placement: this scene gets one object fewer
        canvas[mask] = pixels[mask]
        owner[mask] = len(sources)
        sources.append(j)
        full_areas.append(area)
    objects = [
        SceneObject(source_index=j, label=int(labels[j]), mask=owner == k, full_area=full_areas[k])
        for k, j in enumerate(sources)
    ]
    return canvas, objects


# ---------------------------------------------------------------------------------------------- presets
Bands = tuple[tuple[float, float], ...]  # a union of [lo, hi] intervals (sampled by length, then uniformly)


@dataclass(frozen=True)
class SceneSettings:
    """The ranges a preset draws a scene from (see the module docstring)."""

    name: str
    code: int  # seed component (0 = v1, whose seed has none)
    side: Bands = ((64.0, 64.0),)  # canvas sqrt(width * height), px
    aspect: Bands = ((1.0, 1.0),)  # width / height
    scale: Bands = (SCALE_RANGE,)  # garment side / shorter canvas side (log-uniform within a band)
    objects: tuple[int, int] = (2, 4)
    disjoint_prob: float = 0.0  # chance that a scene keeps all masks disjoint (else the occlusion rule)
    min_garment_px: int = 2
    min_visible_px: int = MIN_VISIBLE_PIXELS
    backgrounds: tuple[tuple[str, float], ...] = (("black", 1.0),)  # kind, weight
    level: Bands = ((0.0, 0.0),)  # background mean, 0..1
    noise: Bands = ((0.0, 0.0),)  # Gaussian noise sigma (kind "noise"; half the other non-black scenes)
    texture_amp: Bands = ((0.0, 0.0),)  # amplitude of stripes / blobs / checker
    garment_contrast: tuple[float, float] = (1.0, 1.0)
    garment_gamma: tuple[float, float] = (1.0, 1.0)
    brightness: tuple[float, float] = (0.0, 0.0)  # global, added
    contrast: tuple[float, float] = (1.0, 1.0)  # global, multiplied around 0
    gamma: tuple[float, float] = (1.0, 1.0)  # global

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


PRESETS: dict[str, SceneSettings] = {
    "v1": SceneSettings(name="v1", code=0),
    "v2": SceneSettings(
        name="v2",
        code=2,
        side=((48.0, 256.0),),
        aspect=((0.75, 1.333),),
        scale=((0.1, 0.67),),
        objects=(1, 6),
        disjoint_prob=0.5,
        min_garment_px=8,
        min_visible_px=12,
        backgrounds=(
            ("black", 0.2),
            ("flat", 0.2),
            ("noise", 0.2),
            ("gradient", 0.2),
            ("stripes", 0.1),
            ("blobs", 0.1),
        ),
        level=((0.0, 0.35),),
        noise=((0.01, 0.09),),
        texture_amp=((0.02, 0.08),),
        garment_contrast=(0.6, 1.15),
        garment_gamma=(0.7, 1.5),
        brightness=(-0.06, 0.06),
        contrast=(0.8, 1.2),
        gamma=(0.8, 1.25),
    ),
    "shifted": SceneSettings(
        name="shifted",
        code=3,
        side=((288.0, 512.0),),
        aspect=((0.5, 0.75), (1.333, 2.0)),
        scale=((0.06, 0.1), (0.67, 0.8)),
        objects=(1, 6),
        disjoint_prob=0.5,
        min_garment_px=8,
        min_visible_px=12,
        backgrounds=(("flat", 0.25), ("noise", 0.25), ("gradient", 0.25), ("checker", 0.25)),
        level=((0.36, 0.5),),
        noise=((0.1, 0.14),),
        texture_amp=((0.09, 0.12),),
        garment_contrast=(0.6, 1.15),
        garment_gamma=(0.7, 1.5),
        brightness=(-0.06, 0.06),
        contrast=(0.8, 1.2),
        gamma=(0.8, 1.25),
    ),
}


def _draw(bands: Bands, rng: np.random.Generator, log: bool = False) -> float:
    lengths = np.array([hi - lo for lo, hi in bands], dtype=np.float64)
    k = int(rng.choice(len(bands), p=lengths / lengths.sum())) if len(bands) > 1 and lengths.sum() > 0 else 0
    lo, hi = bands[k]
    if log and lo > 0:
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return float(rng.uniform(lo, hi))


def background(kind: str, height: int, width: int, st: SceneSettings, rng: np.random.Generator) -> np.ndarray:
    """float32 [height, width] in 0..1: the canvas before any garment."""
    if kind == "black":
        return np.zeros((height, width), np.float32)
    level = _draw(st.level, rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind in ("flat", "noise"):
        bg = np.full((height, width), level, np.float32)
    elif kind == "gradient":  # a linear ramp between two levels of the band, any direction
        other = _draw(st.level, rng)
        t = np.cos(a := rng.uniform(0, 2 * np.pi)) * xx / width + np.sin(a) * yy / height
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        bg = (level + (other - level) * t).astype(np.float32)
    elif kind == "stripes":
        period = rng.uniform(4.0, 24.0)
        a = rng.uniform(0, np.pi)
        bg = level + _draw(st.texture_amp, rng) * np.sin(
            2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period
        )
    elif kind == "blobs":  # smooth low-frequency noise: a coarse random grid, bilinearly upsampled
        cells = rng.standard_normal((int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float32)
        up = np.asarray(Image.fromarray(cells, mode="F").resize((width, height), Image.Resampling.BILINEAR))
        bg = level + _draw(st.texture_amp, rng) * up / max(float(np.abs(up).max()), 1e-6)
    elif kind == "checker":
        cell = rng.uniform(6.0, 20.0)
        sign = ((xx // cell + yy // cell) % 2) * 2 - 1
        bg = level + _draw(st.texture_amp, rng) * sign
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    if kind == "noise" or rng.random() < 0.5:
        bg = bg + rng.normal(0.0, _draw(st.noise, rng), (height, width))
    return np.clip(bg, 0.0, 1.0).astype(np.float32)


def compose_varied(
    images: np.ndarray,
    labels: np.ndarray,
    height: int,
    width: int,
    n_objects: int,
    st: SceneSettings,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[SceneObject]]:
    """A non-v1 scene: (uint8 [height, width] canvas, objects). Masks come from the resized garments
    (before jitter and compositing), so they hold on any background."""
    kinds = [k for k, _ in st.backgrounds]
    weights = np.array([w for _, w in st.backgrounds], dtype=np.float64)
    canvas = background(kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))], height, width, st, rng)
    owner = np.full((height, width), -1, dtype=np.int64)
    disjoint = rng.random() < st.disjoint_prob
    short = min(height, width)
    sources: list[int] = []
    full_areas: list[int] = []
    for _ in range(n_objects):
        for _try in range(PLACEMENT_TRIES):
            j = int(rng.integers(len(images)))
            side = min(short, max(st.min_garment_px, int(round(_draw(st.scale, rng, log=True) * short))))
            y0, x0 = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            garment = np.asarray(Image.fromarray(images[j]).resize((side, side), RESAMPLE))
            gmask = garment > MASK_THRESHOLD
            area = int(gmask.sum())
            if area < st.min_visible_px:
                continue
            mask = np.zeros((height, width), dtype=bool)
            mask[y0 : y0 + side, x0 : x0 + side] = gmask
            if disjoint:
                if (owner[mask] >= 0).any():
                    continue
                break
            kept = np.bincount(owner[~mask] + 1, minlength=len(sources) + 1)[1:]
            if all(
                k >= max(MIN_VISIBLE_FRACTION * a, st.min_visible_px)
                for k, a in zip(kept, full_areas, strict=True)
            ):
                break
        else:
            continue
        g = (garment.astype(np.float32) / 255.0) ** rng.uniform(*st.garment_gamma) * rng.uniform(
            *st.garment_contrast
        )
        region = canvas[y0 : y0 + side, x0 : x0 + side]
        region[gmask] = np.clip(g[gmask], 0.0, 1.0)
        owner[mask] = len(sources)
        sources.append(j)
        full_areas.append(area)
    canvas = np.clip(canvas, 0.0, 1.0) ** rng.uniform(*st.gamma) * rng.uniform(*st.contrast) + rng.uniform(
        *st.brightness
    )
    objects = [
        SceneObject(source_index=j, label=int(labels[j]), mask=owner == k, full_area=full_areas[k])
        for k, j in enumerate(sources)
    ]
    return np.rint(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8), objects


def canvas_shape(st: SceneSettings, rng: np.random.Generator, size: int | None) -> tuple[int, int]:
    """(height, width) of a scene: ``size`` x ``size`` when fixed, else drawn from the preset."""
    if size is not None:
        return size, size
    side, aspect = _draw(st.side, rng, log=True), _draw(st.aspect, rng, log=True)
    return max(16, int(round(side / np.sqrt(aspect)))), max(16, int(round(side * np.sqrt(aspect))))


def tight_box(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of a non-empty boolean mask, in pixel units (w = x_max - x_min + 1)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def _load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = FashionMNIST(root, split=split)
    images, labels = ds.images, ds.labels
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise DataError(
            f"{root}: {split} images must be a non-empty uint8 [N, H, W] array, "
            f"got {images.dtype} {images.shape}"
        )
    if labels.min() < 0 or labels.max() >= len(FMNIST_CLASSES):
        raise DataError(f"{root}: {split} labels outside 0..{len(FMNIST_CLASSES) - 1}")
    return images, labels


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    # Fixed separators and key order: part of the byte-identical output guarantee.
    text = json.dumps(
        obj, indent=indent, separators=(",", ": ") if indent else (",", ":"), ensure_ascii=False
    )
    path.write_text(text + "\n", encoding="utf-8")


def _generate_split(
    split: str,
    n: int,
    out: Path,
    images: np.ndarray,
    labels: np.ndarray,
    size: int | None,
    min_objects: int,
    max_objects: int,
    seed: int,
    settings: SceneSettings = PRESETS["v1"],
) -> dict[str, Any]:
    folder, coco_name, split_code = SPLITS[split]
    img_dir, ann_dir = out / "ade" / "images" / folder, out / "ade" / "annotations" / folder
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    coco_images: list[dict[str, Any]] = []
    coco_anns: list[dict[str, Any]] = []
    histogram = [0] * len(FMNIST_CLASSES)
    log_every = max(1, n // 10)
    for i in range(n):
        v1 = settings.code == 0
        rng = np.random.default_rng([seed, split_code, i] if v1 else [seed, split_code, i, settings.code])
        height, width = (size or 64, size or 64) if v1 else canvas_shape(settings, rng, size)
        n_objects = int(rng.integers(min_objects, max_objects + 1))
        for _ in range(SCENE_TRIES):
            if v1:
                canvas, objects = compose_scene(images, labels, height, n_objects, rng)
            else:
                canvas, objects = compose_varied(images, labels, height, width, n_objects, settings, rng)
            if len(objects) >= min_objects:
                break
        else:
            raise RuntimeError(
                f"{split} scene {i}: could not place {min_objects} garments on a {width}x{height} canvas "
                f"in {SCENE_TRIES} tries"
            )
        label_map = np.zeros((height, width), dtype=np.uint8)
        for obj in objects:
            label_map[obj.mask] = obj.label + 1
        stem = f"scene_{split}_{i:06d}"
        Image.fromarray(np.repeat(canvas[:, :, None], 3, axis=2)).save(img_dir / f"{stem}.png", format="PNG")
        Image.fromarray(label_map).save(ann_dir / f"{stem}.png", format="PNG")

        image_id = i + 1
        coco_images.append({"id": image_id, "file_name": f"{stem}.png", "width": width, "height": height})
        rles = masks_to_rle(np.stack([o.mask for o in objects]).astype(np.uint8))
        for obj, rle in zip(objects, rles, strict=True):
            coco_anns.append(
                {
                    "id": len(coco_anns) + 1,
                    "image_id": image_id,
                    "category_id": obj.label + 1,
                    "bbox": tight_box(obj.mask),
                    "area": int(obj.mask.sum()),
                    "iscrowd": 0,
                    "segmentation": rle,
                }
            )
            histogram[obj.label] += 1
        if (i + 1) % log_every == 0 or i + 1 == n:
            _logger.info("%s: %d/%d scenes, %d objects", split, i + 1, n, len(coco_anns))

    coco_path = out / "coco" / "annotations" / coco_name
    coco_path.parent.mkdir(parents=True, exist_ok=True)
    coco = {
        "info": {"description": f"Fashion-MNIST scenes, {split} split (images under ade/images/{folder})"},
        "licenses": [],
        "images": coco_images,
        "annotations": coco_anns,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "garment"} for k, name in enumerate(FMNIST_CLASSES)
        ],
    }
    _write_json(coco_path, coco)
    return {
        "images": n,
        "objects": len(coco_anns),
        "class_histogram": histogram,
        "image_dir": img_dir.relative_to(out).as_posix(),
        "annotation_dir": ann_dir.relative_to(out).as_posix(),
        "coco": coco_path.relative_to(out).as_posix(),
    }


def generate_scenes(
    out_dir: str | Path,
    n_train: int = 10000,
    n_test: int = 2000,
    size: int | None = None,
    min_objects: int | None = None,
    max_objects: int | None = None,
    seed: int = 0,
    fmnist_root: str | Path = FMNIST_DIR,
    overwrite: bool = False,
    preset: str | SceneSettings = "v1",
) -> dict[str, Any]:
    """Write the scenes (see the module docstring) and return their summary.

    The summary is what ``out_dir/scenes.json`` holds (arguments, generator constants, class names, per-split
    counts, class histograms and paths relative to ``out_dir``) plus ``out_dir`` itself. An existing
    ``ade``/``coco``/``scenes.json`` under ``out_dir`` raises ``FileExistsError`` unless ``overwrite``.
    """
    if isinstance(preset, SceneSettings):  # a custom variant (tests: v2 without black backgrounds)
        settings, preset = preset, preset.name
    elif preset not in PRESETS:
        raise ValueError(f"unknown scene preset {preset!r}; presets: {sorted(PRESETS)}")
    else:
        settings = PRESETS[preset]
    if preset == "v1" and size is None:
        size = 64
    min_objects = settings.objects[0] if min_objects is None else min_objects
    max_objects = settings.objects[1] if max_objects is None else max_objects
    if size is not None and size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"scene counts must be >= 0, got {n_train}, {n_test}")
    out = Path(out_dir)
    ours = [out / "ade", out / "coco", out / "scenes.json"]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out}: already holds {[p.name for p in existing]} (pass overwrite=True / --overwrite)"
        )
    for p in existing:  # only our own outputs, never anything else under out_dir
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    root = Path(fmnist_root)
    summary: dict[str, Any] = {
        "args": {
            "n_train": n_train,
            "n_test": n_test,
            "size": size,
            "min_objects": min_objects,
            "max_objects": max_objects,
            "seed": seed,
            "fmnist_root": str(root),
            "preset": preset,
        },
        "scene_version": preset,
        "settings": settings.to_dict(),
        "generator": {
            "interpolation": "bilinear",
            "mask_threshold": MASK_THRESHOLD,
            "scale_range": list(SCALE_RANGE),
            "min_visible_fraction": MIN_VISIBLE_FRACTION,
            "min_visible_pixels": MIN_VISIBLE_PIXELS,
        },
        "classes": list(FMNIST_CLASSES),  # COCO category id k+1 = classes[k]
        "segmentation_classes": ["background", *FMNIST_CLASSES],  # indexed by label-map value
        "ignore_index": IGNORE_INDEX,
        "splits": {},
    }
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = _load_split(root, split)
        _logger.info("%s: %d scenes from %d Fashion-MNIST %s images", out, n, len(images), split)
        summary["splits"][split] = _generate_split(
            split, n, out, images, labels, size, min_objects, max_objects, seed, settings
        )
    _write_json(out / "scenes.json", summary, indent=2)
    return {**summary, "out_dir": str(out.resolve())}


def generate_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`generate_scenes` with the options :func:`training.dense.cli.add_scenes_arguments` parsed."""
    return generate_scenes(
        args.out,
        n_train=args.train,
        n_test=args.test,
        size=args.size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        seed=args.seed,
        fmnist_root=args.fmnist_root or FMNIST_DIR,
        overwrite=args.overwrite,
        preset=args.preset,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m training.dense.scenes", description=__doc__.split("\n\n")[0])
    add_scenes_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = generate_from_args(args)
    except (DataError, FileExistsError, ValueError) as e:
        p.error(str(e))  # exit status 2 with the message, as for a malformed option
    for split, s in summary["splits"].items():
        _logger.info(
            "%s: %d images, %d objects, per class %s", split, s["images"], s["objects"], s["class_histogram"]
        )
    return summary


if __name__ == "__main__":
    main()
