"""Evaluate the dense heads (issue 14) on the torch checkpoints or on an exported bundle, with the SERVED
post-processing either way: the service's preprocessing (``service.imaging.Preprocessor``: resize the
whole canvas to the head's S x S input, stretch, no crop), its label-map resize (``service.dense.label_map``)
and its detection path (``service.routers.detect.detect_one``: score threshold, class-agnostic NMS, boxes
scaled back to the canvas, masks resized to it). The bundle path is torch-free (ONNX Runtime backend).

    # torch checkpoints
    python bench/dense_eval.py --segment runs/seg_v2/segment.safetensors \
        --detect runs/det_v2/detect.safetensors --val runs/scenes_v2 --shifted runs/scenes_shifted \
        --out runs/evals/dense_v2_torch.json --grids docs/dense
    # the shipped bundle (same numbers, from the graphs)
    python bench/dense_eval.py --bundle models/default --val runs/scenes_v2 --shifted runs/scenes_shifted \
        --out runs/evals/dense_v2_bundle.json

Reported per scene set (val = in distribution, shifted = outside the training ranges):

* segmentation: mIoU over background + 10 classes and per-class IoU (mmseg definitions), at the canvas size;
* detection: COCO box mAP / AP50 / AP75 and mask mAP / AP50 (class-aware, pycocotools) of every detection
  the served path returns at score >= 0 (NMS applied), plus precision / recall / F1 at IoU 0.5 at each
  ``--thresholds`` score threshold (the served one included);
* single garment: ``--garments`` Fashion-MNIST *test* garments, one per black canvas, the canvas side cycling
  over ``SIZES`` (28..512 px). Two placements: ``half``: the garment's 28x28 frame resized to half the canvas
  side at a random position (inside the v2 training range of 0.1-0.67); ``full``: the Fashion-MNIST image
  itself resized to the canvas (the frame fills it; the garment spans ~0.6-1.0 of the side). Rate of
  exactly one detection, of the right class, at the served threshold;
* empty canvases: ``--canvases`` garment-free canvases (v2 background kinds, and the shifted ones): the
  fraction of pixels segmentation labels background, and detections per canvas at the served threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import dense  # noqa: E402
from service.bundle import ImageSpec  # noqa: E402
from service.imaging import Decoded, Limits, Preprocessor  # noqa: E402
from service.routers.detect import detect_one  # noqa: E402
from service.schemas import MaskFormat  # noqa: E402
from training.dense import grid as G  # noqa: E402
from training.dense import scenes as S  # noqa: E402
from training.dense.metrics import SegmentationMeter, coco_evaluate, load_coco  # noqa: E402

_logger = logging.getLogger("dense_eval")
SIZES = (28, 40, 56, 64, 80, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
_LIMITS = Limits(max_pixels=1 << 30, min_side=1)


# ---------------------------------------------------------------------------------------------- heads
class Heads:
    """What the evaluation needs from a pair of dense heads: preprocessing, classes and raw graph outputs."""

    name = "heads"
    score_threshold: float = 0.5
    nms_iou: float | None = 0.5
    scenes: dict[str, Any] | None = None

    def image(self, task: str) -> ImageSpec:
        raise NotImplementedError

    def classes(self, task: str) -> list[str]:
        raise NotImplementedError

    def has(self, task: str) -> bool:
        raise NotImplementedError

    def segment(self, x: np.ndarray) -> np.ndarray:  # [1, 3, S, S] -> logits [1, C, S, S]
        raise NotImplementedError

    def detect(self, x: np.ndarray) -> dict[str, np.ndarray]:  # [1, 3, S, S] -> boxes/labels/scores/masks
        raise NotImplementedError


class BundleHeads(Heads):
    """The bundle's ``segment.onnx`` / ``detect.onnx`` through the service's ONNX Runtime backend (no
    torch)."""

    def __init__(
        self, path: str | Path, threads: int = 1, tasks: tuple[str, ...] = ("segment", "detect")
    ) -> None:
        from service.backends.base import BackendOptions
        from service.backends.onnxruntime import OnnxRuntimeBackend
        from service.bundle import load_bundle

        self.bundle = load_bundle(path)
        self.name = f"bundle:{path}"
        tasks = tuple(t for t in tasks if t in self.bundle.spec["tasks"])
        self.backend = OnnxRuntimeBackend(BackendOptions(device="cpu", threads=threads))
        self.backend.load(self.bundle, "fp32", tasks)
        det = self.bundle.spec["tasks"].get("detect", {})
        self.score_threshold = float(det.get("score_threshold", 0.5))
        self.nms_iou = det.get("nms_iou_threshold")
        self.scenes = (self.bundle.spec["tasks"].get("segment") or det).get("scenes")

    def image(self, task: str) -> ImageSpec:
        return self.bundle.image_for(task)

    def classes(self, task: str) -> list[str]:
        return self.bundle.classes(task)

    def has(self, task: str) -> bool:
        return task in self.backend.capabilities

    def segment(self, x: np.ndarray) -> np.ndarray:
        return self.backend.infer("segment", {"images": x})

    def detect(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.backend.infer_outputs("detect", {"images": x})


class TorchHeads(Heads):
    """``segment.safetensors`` / ``detect.safetensors`` from ``training/run.py segment|detect``."""

    def __init__(
        self,
        segment: str | None,
        detect: str | None,
        score_threshold: float = 0.5,
        nms_iou: float | None = None,
    ) -> None:
        import torch

        from training.dense.train import load_dense_model

        self.torch = torch
        self.models: dict[str, Any] = {}
        self.specs: dict[str, ImageSpec] = {}
        self._classes: dict[str, list[str]] = {}
        self.name = f"torch:{segment},{detect}"
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        for task, path in (("segment", segment), ("detect", detect)):
            if not path:
                continue
            model, cfg, pre, classes = load_dense_model(path)
            s, p = cfg.model.img_size, int(pre.get("patch_size", 4))
            self.models[task] = model.eval()
            self.specs[task] = ImageSpec(
                size=s,
                mean=tuple(pre["mean"]),
                std=tuple(pre["std"]),
                interpolation=pre.get("interpolation", "bicubic"),
                patch_size=p,
                grid=(s // p, s // p),
                num_patches=(s // p) ** 2,
                channels=3,
            )
            self._classes[task] = list(classes)
            self.scenes = self.scenes or pre.get("scenes")
            if task == "detect" and nms_iou is None:
                self.nms_iou = cfg.model.agnostic_nms_iou

    def image(self, task: str) -> ImageSpec:
        return self.specs[task]

    def classes(self, task: str) -> list[str]:
        return self._classes[task]

    def has(self, task: str) -> bool:
        return task in self.models

    def segment(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.models["segment"](self.torch.from_numpy(x)).float().numpy()

    def detect(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            out = self.models["detect"]([self.torch.from_numpy(x[0])])[0]
        return {k: v.float().numpy() if k != "labels" else v.numpy() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- helpers
def _decoded(pre: Preprocessor, img: Image.Image) -> Decoded:
    rgb = img.convert("RGB")
    return Decoded(pre.to_array(pre.resize(rgb)), rgb.size)


def _served_detections(
    heads: Heads,
    outs: dict[str, np.ndarray],
    d: Decoded,
    threshold: float,
    masks: MaskFormat = MaskFormat.none,
) -> list[dict[str, Any]]:
    size = heads.image("detect").size
    return detect_one(outs, d, heads.classes("detect"), size, threshold, 100, masks, heads.nms_iou)[
        "detections"
    ]


def _iou_xyxy(a: list[float], b: list[float]) -> float:
    return float(dense.box_iou(np.array([a]), np.array([b]))[0, 0])


def match_counts(
    dets: list[dict[str, Any]], gts: list[tuple[list[float], int]], iou: float = 0.5
) -> tuple[int, int, int]:
    """(true positives, detections, ground truths): greedy class-aware matching at ``iou``, best score
    first."""
    used = [False] * len(gts)
    tp = 0
    for d in sorted(dets, key=lambda d: -d["score"]):
        best, best_j = iou, -1
        for j, (box, lab) in enumerate(gts):
            if used[j] or lab != d["label"]:
                continue
            v = _iou_xyxy(d["box"], box)
            if v >= best:
                best, best_j = v, j
        if best_j >= 0:
            used[best_j] = True
            tp += 1
    return tp, len(dets), len(gts)


def _prf(tp: int, nd: int, ng: int) -> dict[str, float]:
    p, r = tp / max(nd, 1), tp / max(ng, 1)
    return {
        "precision": round(100 * p, 2),
        "recall": round(100 * r, 2),
        "f1": round(100 * 2 * p * r / max(p + r, 1e-9), 2),
    }


# ---------------------------------------------------------------------------------------------- evaluations
def eval_segmentation(
    heads: Heads, root: Path, limit: int | None, grid: Path | None = None
) -> dict[str, Any]:
    from training.dense.datasets import SegmentationFolder

    ds = SegmentationFolder(root / "ade", "validation")
    classes = heads.classes("segment")
    pre = Preprocessor(heads.image("segment"), _LIMITS)
    meter = SegmentationMeter(len(classes))
    rows = []
    n = min(len(ds), limit or len(ds))
    t0 = time.perf_counter()
    for i in range(n):
        img, gt = ds[i]
        d = _decoded(pre, img)
        lab = dense.label_map(heads.segment(d.array[None])[0], d.size[1], d.size[0])
        meter.update(lab, gt)
        if grid is not None and i < 6:
            rows.append(
                [G.det_tile(np.asarray(img), np.zeros((0, 4)), [], classes), G.seg_tile(gt), G.seg_tile(lab)]
            )
    res = meter.compute()
    res["per_class_iou"] = dict(zip(classes, res["per_class_iou"], strict=True))
    res.update(images=n, seconds=round(time.perf_counter() - t0, 1))
    if grid is not None:
        G.compose_grid(rows, classes, grid)
    return res


def eval_detection(
    heads: Heads, root: Path, limit: int | None, thresholds: tuple[float, ...], grid: Path | None = None
) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    coco = load_coco(root / "coco" / "annotations" / "instances_val.json")
    image_dir = root / "ade" / "images" / "validation"
    cat_ids = sorted(coco.getCatIds())
    classes = heads.classes("detect")
    pre = Preprocessor(heads.image("detect"), _LIMITS)
    ids = sorted(coco.getImgIds())[: limit or None]
    dets: list[dict[str, Any]] = []
    counts = {t: [0, 0, 0] for t in thresholds}
    per_image_gt_dets: list[tuple[int, int]] = []
    rows = []
    t0 = time.perf_counter()
    for k, image_id in enumerate(ids):
        info = coco.imgs[image_id]
        with Image.open(image_dir / info["file_name"]) as im:
            img = im.convert("RGB")
        d = _decoded(pre, img)
        outs = heads.detect(d.array[None])
        served = _served_detections(heads, outs, d, 0.0, MaskFormat.rle)
        for det in served:
            x1, y1, x2, y2 = det["box"]
            rle = mask_utils.frPyObjects(det["mask"], *det["mask"]["size"])
            rle["counts"] = rle["counts"].decode("ascii")
            dets.append(
                {
                    "image_id": image_id,
                    "category_id": cat_ids[det["label"] - 1],
                    "score": det["score"],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": rle,
                }
            )
        anns = coco.imgToAnns.get(image_id, [])
        gts = [
            (
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
                cat_ids.index(a["category_id"]) + 1,
            )
            for a in anns
        ]
        for t in thresholds:
            kept = [x for x in served if x["score"] >= t]
            for j, v in enumerate(match_counts(kept, gts)):
                counts[t][j] += v
        per_image_gt_dets.append((len(gts), sum(x["score"] >= heads.score_threshold for x in served)))
        if grid is not None and k < 6:
            arr = np.asarray(img)
            gt_masks = np.stack([coco.annToMask(a) for a in anns]) if anns else None
            kept = [x for x in served if x["score"] >= heads.score_threshold]
            pm = (
                np.stack(
                    [mask_utils.decode(mask_utils.frPyObjects(x["mask"], *x["mask"]["size"])) for x in kept]
                )
                if kept
                else None
            )
            rows.append(
                [
                    G.det_tile(arr, np.zeros((0, 4)), [], classes),
                    G.det_tile(
                        arr,
                        np.array([b for b, _ in gts]).reshape(-1, 4),
                        [lab for _, lab in gts],
                        classes,
                        None,
                        gt_masks,
                    ),
                    G.det_tile(
                        arr,
                        np.array([x["box"] for x in kept]).reshape(-1, 4),
                        [x["label"] for x in kept],
                        classes,
                        [x["score"] for x in kept],
                        pm,
                    ),
                ]
            )
    res: dict[str, Any] = dict(coco_evaluate(coco, dets, img_ids=ids))
    res["detections_at_score_0"] = len(dets)
    res["at_threshold"] = {str(t): _prf(*counts[t]) for t in thresholds}
    res["served_threshold"] = heads.score_threshold
    res["nms_iou"] = heads.nms_iou
    res.update(images=len(ids), seconds=round(time.perf_counter() - t0, 1))
    if grid is not None:
        G.compose_grid(rows, classes, grid)
    return res


def single_garments(
    heads: Heads, fmnist_root: Path, n: int, thresholds: tuple[float, ...], n_full: int | None = None
) -> dict[str, Any]:
    """Exactly-one-detection-of-the-right-class rates (see the module docstring for the garment scale);
    ``n`` garments placed "half", ``n_full`` (default ``n``) placed "full"."""
    from training.data import FashionMNIST

    ds = FashionMNIST(fmnist_root, split="test")
    pre = Preprocessor(heads.image("detect"), _LIMITS)
    out: dict[str, Any] = {"garments": n, "sizes": list(SIZES), "served_threshold": heads.score_threshold}
    t0 = time.perf_counter()
    for placement, n_place in (("half", n), ("full", n if n_full is None else n_full)):
        if n_place <= 0:
            continue
        ok = {t: 0 for t in thresholds}
        one = {t: 0 for t in thresholds}
        per_size = {c: [0, 0] for c in SIZES}
        rng = np.random.default_rng(14)
        for i in range(n_place):
            c = SIZES[i % len(SIZES)]
            garment, label = ds.images[i], int(ds.labels[i])
            canvas = np.zeros((c, c), np.uint8)
            if placement == "full":
                canvas = np.asarray(Image.fromarray(garment).resize((c, c), Image.Resampling.BILINEAR))
            else:
                side = max(4, c // 2)
                y0, x0 = (int(v) for v in rng.integers(0, c - side + 1, size=2))
                canvas[y0 : y0 + side, x0 : x0 + side] = np.asarray(
                    Image.fromarray(garment).resize((side, side), S.RESAMPLE)
                )
            d = _decoded(pre, Image.fromarray(canvas))
            served = _served_detections(heads, heads.detect(d.array[None]), d, min(thresholds))
            for t in thresholds:
                kept = [x for x in served if x["score"] >= t]
                one[t] += len(kept) == 1
                ok[t] += len(kept) == 1 and kept[0]["label"] == label + 1
            kept = [x for x in served if x["score"] >= heads.score_threshold]
            per_size[c][0] += len(kept) == 1 and kept[0]["label"] == label + 1
            per_size[c][1] += 1
        out[placement] = {
            "garments": n_place,
            "exactly_one_right_class": {str(t): round(100 * ok[t] / n_place, 2) for t in thresholds},
            "exactly_one_any_class": {str(t): round(100 * one[t] / n_place, 2) for t in thresholds},
            "per_size_at_served": {str(c): round(100 * a / max(b, 1), 1) for c, (a, b) in per_size.items()},
        }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def empty_canvases(heads: Heads, n: int) -> dict[str, Any]:
    """Garment-free canvases: fraction labelled background (segment) and detections per canvas (detect)."""
    out: dict[str, Any] = {"canvases": n}
    for preset, kinds in (
        ("v2", ("flat", "noise", "gradient", "stripes", "blobs")),
        ("shifted", ("flat", "noise", "gradient", "checker")),
    ):
        st = S.PRESETS[preset]
        rng = np.random.default_rng([14, st.code])
        bg_frac, n_dets = [], []
        for i in range(n):
            c = SIZES[i % len(SIZES)]
            h, w = c, int(SIZES[(i * 7 + 3) % len(SIZES)])
            canvas = np.rint(S.background(kinds[i % len(kinds)], h, w, st, rng) * 255).astype(np.uint8)
            img = Image.fromarray(np.repeat(canvas[:, :, None], 3, axis=2))
            if heads.has("segment"):
                pre = Preprocessor(heads.image("segment"), _LIMITS)
                d = _decoded(pre, img)
                lab = dense.label_map(heads.segment(d.array[None])[0], h, w)
                bg_frac.append(float((lab == 0).mean()))
            if heads.has("detect"):
                pre = Preprocessor(heads.image("detect"), _LIMITS)
                d = _decoded(pre, img)
                n_dets.append(
                    len(_served_detections(heads, heads.detect(d.array[None]), d, heads.score_threshold))
                )
        out[preset] = {
            "background_fraction": round(100 * float(np.mean(bg_frac)), 2) if bg_frac else None,
            "min_background_fraction": round(100 * float(np.min(bg_frac)), 2) if bg_frac else None,
            "detections_per_canvas": round(float(np.mean(n_dets)), 3) if n_dets else None,
            "canvases_with_a_detection": round(100 * float(np.mean([k > 0 for k in n_dets])), 2)
            if n_dets
            else None,
        }
    return out


# ---------------------------------------------------------------------------------------------- main
def evaluate(
    heads: Heads,
    sets: dict[str, Path],
    limit: int | None,
    garments: int,
    canvases: int,
    fmnist_root: Path,
    thresholds: tuple[float, ...],
    grids: Path | None,
    log: Callable[[str], None] = _logger.info,
    garments_full: int | None = None,
) -> dict[str, Any]:
    thresholds = tuple(sorted({*thresholds, heads.score_threshold}))
    res: dict[str, Any] = {
        "heads": heads.name,
        "scenes": heads.scenes,
        "score_threshold": heads.score_threshold,
        "nms_iou": heads.nms_iou,
        "sets": {},
    }
    for name, root in sets.items():
        r: dict[str, Any] = {"root": str(root)}
        if heads.has("segment"):
            r["segment"] = eval_segmentation(
                heads, root, limit, grids / f"{name}_segment.png" if grids else None
            )
            log(f"{name} segment: mIoU {r['segment']['mIoU']} ({r['segment']['seconds']} s)")
        if heads.has("detect"):
            r["detect"] = eval_detection(
                heads, root, limit, thresholds, grids / f"{name}_detect.png" if grids else None
            )
            log(
                f"{name} detect: box AP50 {r['detect']['bbox_mAP_50']} mAP {r['detect']['bbox_mAP']} "
                f"mask AP50 {r['detect']['segm_mAP_50']} ({r['detect']['seconds']} s)"
            )
        res["sets"][name] = r
    if heads.has("detect") and garments:
        res["single_garment"] = single_garments(heads, fmnist_root, garments, thresholds, garments_full)
        placed = {k: v for k, v in res["single_garment"].items() if k in ("half", "full")}
        log(f"single garment: {json.dumps(placed)}")
    if canvases:
        res["empty_canvases"] = empty_canvases(heads, canvases)
        log(f"empty canvases: {json.dumps(res['empty_canvases'])}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="an exported bundle (spec.json, segment.onnx, detect.onnx)")
    p.add_argument("--segment", help="segment.safetensors (torch path)")
    p.add_argument("--detect", help="detect.safetensors (torch path)")
    p.add_argument(
        "--score-threshold", type=float, default=0.5, help="torch path: the served score threshold"
    )
    p.add_argument(
        "--nms-iou", type=float, default=None, help="torch path: class-agnostic NMS IoU (default: the head's)"
    )
    p.add_argument("--val", type=Path, default=Path("runs/scenes_v2"), help="in-distribution scenes")
    p.add_argument("--shifted", type=Path, default=Path("runs/scenes_shifted"), help="shifted scenes")
    p.add_argument("--limit", type=int, default=None, help="first N scenes of each set")
    p.add_argument("--garments", type=int, default=1000, help="single garments, 'half' placement")
    p.add_argument(
        "--garments-full",
        type=int,
        default=None,
        help="single garments, 'full' placement (default: --garments)",
    )
    p.add_argument("--tasks", default="segment,detect", help="evaluate only these heads")
    p.add_argument("--canvases", type=int, default=100)
    p.add_argument("--fmnist-root", type=Path, default=S.FMNIST_DIR)
    p.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    p.add_argument("--grids", type=Path, default=None, help="folder for the prediction-grid PNGs")
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tasks = {t.strip() for t in args.tasks.split(",")}
    if args.bundle:
        heads: Heads = BundleHeads(args.bundle, tasks=tuple(sorted(tasks)))
    elif args.segment or args.detect:
        heads = TorchHeads(
            args.segment if "segment" in tasks else None,
            args.detect if "detect" in tasks else None,
            args.score_threshold,
            args.nms_iou,
        )
    else:
        p.error("give --bundle or --segment/--detect")
    if args.grids:
        args.grids.mkdir(parents=True, exist_ok=True)
    sets = {
        k: v for k, v in (("val", args.val), ("shifted", args.shifted)) if v and (v / "scenes.json").is_file()
    }
    t0 = time.perf_counter()
    res = evaluate(
        heads,
        sets,
        args.limit,
        args.garments,
        args.canvases,
        args.fmnist_root,
        tuple(float(t) for t in args.thresholds.split(",")),
        args.grids,
        garments_full=args.garments_full,
    )
    res["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
