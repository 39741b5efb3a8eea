"""Export trained dense heads (``segment.safetensors`` / ``detect.safetensors`` from ``training/run.py
segment|detect``) into a bundle, with parity checks against PyTorch.

* ``segment.onnx``: ``images`` [batch, 3, S, S] -> ``logits`` [batch, C, S, S] (torch.export/dynamo
  graph, dynamic batch, same path as embed).
* ``detect.onnx``: ``images`` [1, 3, S, S] -> ``boxes`` [N, 4] (x1, y1, x2, y2 in input pixels), ``labels``
  [N] int64 (ids into ``classes``), ``scores`` [N] (descending), ``masks`` [N, 1, S, S] probabilities.
  The whole torchvision Mask R-CNN (RPN, NMS, RoI heads, mask pasting) in one graph, batch 1: the
  TorchScript exporter handles its data-dependent control flow, torch.export does not yet.

Each task entry carries its own ``image`` preprocessing (the heads run at their training size, not the
encoder's pretraining size), ``classes`` (index 0 = background) and, when the head recorded them, the
``scenes`` it was trained on (``version``: the generator preset, e.g. "v2"; ``settings``). ``detect``
also records ``score_threshold`` and ``nms_iou_threshold`` (the service's class-agnostic NMS).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service.bundle_format import sha256_file

from .onnx_common import ExportError, export_graph, ort_session

_logger = logging.getLogger("export")

SEG_MAX_ABS = 1e-3  # logits; the argmax agreement is reported too
DET_MAX_ABS_BOX = 1e-2  # pixels
DET_MAX_ABS_SCORE = 1e-4
DET_MAX_ABS_MASK = 1e-3


class DetectGraph(nn.Module):
    """Mask R-CNN on one image, outputs as four tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = self.model([images[0]])[0]
        return out["boxes"], out["labels"], out["scores"], out["masks"]


def _image_spec(pre: dict[str, Any], cfg: Any, patch: int) -> dict[str, Any]:
    s = cfg.model.img_size
    return {
        "size": s,
        "mean": [float(v) for v in pre["mean"]],
        "std": [float(v) for v in pre["std"]],
        "interpolation": pre.get("interpolation", "bicubic"),
        "color": "rgb",
        "resize_rule": (
            "resize the whole image to size x size (no crop), then scale to [0,1], then (x-mean)/std"
        ),
        "input_size": [s, s],
        "patch_size": patch,
        "grid": [s // patch, s // patch],
        "num_patches": (s // patch) ** 2,
        "channels": 3,
    }


def _real_inputs(pre: dict[str, Any], size: int, root: Path | None, n: int = 4) -> np.ndarray | None:
    """A few validation scenes (when the benchmark folder is present) for parity on real content."""
    from PIL import Image

    if root is None:
        return None
    folder = root / "ade" / "images" / "validation"
    files = sorted(folder.glob("*.png"))[:n] if folder.is_dir() else []
    if not files:
        return None
    mean, std = np.array(pre["mean"], np.float32), np.array(pre["std"], np.float32)
    out = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        out.append(((np.asarray(img, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def _scenes_entry(pre: dict[str, Any]) -> dict[str, Any]:
    """``{"scenes": {...}}`` when the head recorded its training scenes (training/dense/train.py), else {}."""
    scenes = pre.get("scenes")
    return {"scenes": scenes} if isinstance(scenes, dict) else {}


def export_segment(
    head: Path, out_dir: Path, opset: int, rng: np.random.Generator, scenes_root: Path | None = None
) -> dict[str, Any]:
    from training.dense.train import load_dense_model

    loaded: tuple[Any, Any, dict[str, Any], list[str]] = load_dense_model(head)
    model, cfg, pre, classes = loaded
    model.eval()
    s = cfg.model.img_size
    path = out_dir / "segment.onnx"
    export_graph(
        model,
        (torch.from_numpy(rng.standard_normal((2, 3, s, s)).astype(np.float32)),),
        path,
        ["images"],
        ["logits"],
        opset,
    )
    feeds = [rng.standard_normal((3, 3, s, s)).astype(np.float32)]
    real = _real_inputs(pre, s, scenes_root)
    if real is not None:
        feeds.append(real)
    sess = ort_session(path)
    worst, agree = 0.0, 1.0
    for x in feeds:
        (ours,) = sess.run(None, {"images": x})
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        if ours.shape != ref.shape:
            raise ExportError(f"segment.onnx: output {ours.shape} != PyTorch {ref.shape}")
        worst = max(worst, float(np.abs(ours - ref).max()))
        agree = min(agree, float((ours.argmax(1) == ref.argmax(1)).mean()))
    parity = {
        "max_abs_diff": worst,
        "argmax_agreement": agree,
        "bound_max_abs": SEG_MAX_ABS,
        "inputs": len(feeds),
        "real_inputs": real is not None,
    }
    if worst > SEG_MAX_ABS:
        raise ExportError(f"segment.onnx misses the parity bound: {parity}")
    _logger.info("segment.onnx: max abs diff %.2e, argmax agreement %.6f", worst, agree)
    return {
        "file": path.name,
        "inputs": [{"name": "images", "dtype": "float32", "shape": ["batch", 3, s, s]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(classes), s, s]}],
        "precision": "fp32",
        "parity": parity,
        "variants": {},
        "image": _image_spec(pre, cfg, model.backbone.patch_size),
        "classes": list(classes),
        **_scenes_entry(pre),
        "source_sha256": sha256_file(head),
    }


def export_detect(
    head: Path,
    out_dir: Path,
    opset: int,
    rng: np.random.Generator,
    scenes_root: Path | None = None,
    score_threshold: float = 0.5,
    nms_iou_threshold: float | None = 0.5,
) -> dict[str, Any]:
    from training.dense.train import load_dense_model

    loaded: tuple[Any, Any, dict[str, Any], list[str]] = load_dense_model(head)
    model, cfg, pre, classes = loaded
    graph = DetectGraph(model).eval()
    s = cfg.model.img_size
    path = out_dir / "detect.onnx"
    example = _real_inputs(pre, s, scenes_root, n=1)
    if example is None:
        example = rng.standard_normal((1, 3, s, s)).astype(np.float32)
    n_out = {
        "boxes": {0: "num_detections"},
        "labels": {0: "num_detections"},
        "scores": {0: "num_detections"},
        "masks": {0: "num_detections"},
    }
    try:
        with warnings.catch_warnings():  # the TorchScript exporter warns about every traced shape branch
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (torch.from_numpy(example[:1]),),
                str(path),
                dynamo=False,
                opset_version=max(opset, 11),
                input_names=["images"],
                output_names=list(n_out),
                dynamic_axes=n_out,
            )
    except Exception as e:  # noqa: BLE001 (the exporter raises many types)
        raise ExportError(f"ONNX export of detect.onnx failed: {type(e).__name__}: {str(e)[:500]}") from e
    feeds = [example[:1]]
    real = _real_inputs(pre, s, scenes_root, n=4)
    if real is not None:
        feeds += [real[i : i + 1] for i in range(len(real))]
    feeds.append(
        np.full((1, 3, s, s), -float(np.array(pre["mean"]).mean() / np.array(pre["std"]).mean()), np.float32)
    )
    sess = ort_session(path)
    w_box = w_score = w_mask = 0.0
    total = 0
    for x in feeds:
        boxes, labels, scores, masks = sess.run(None, {"images": x})
        with torch.no_grad():
            rb, rl, rs, rm = (t.numpy() for t in graph(torch.from_numpy(x)))
        if len(boxes) != len(rb) or not np.array_equal(labels, rl):
            raise ExportError(
                f"detect.onnx: {len(boxes)} detections (labels {labels[:10]}) "
                f"vs PyTorch {len(rb)} ({rl[:10]})"
            )
        total += len(boxes)
        if len(boxes):
            w_box = max(w_box, float(np.abs(boxes - rb).max()))
            w_score = max(w_score, float(np.abs(scores - rs).max()))
            w_mask = max(w_mask, float(np.abs(masks - rm).max()))
    parity = {
        "max_abs_box": w_box,
        "max_abs_score": w_score,
        "max_abs_mask": w_mask,
        "detections": total,
        "inputs": len(feeds),
        "real_inputs": real is not None,
        "bound_max_abs_box": DET_MAX_ABS_BOX,
        "bound_max_abs_score": DET_MAX_ABS_SCORE,
        "bound_max_abs_mask": DET_MAX_ABS_MASK,
    }
    if w_box > DET_MAX_ABS_BOX or w_score > DET_MAX_ABS_SCORE or w_mask > DET_MAX_ABS_MASK:
        raise ExportError(f"detect.onnx misses the parity bounds: {parity}")
    _logger.info(
        "detect.onnx: %d detections on %d inputs, max abs diff box %.2e score %.2e mask %.2e",
        total,
        len(feeds),
        w_box,
        w_score,
        w_mask,
    )
    return {
        "file": path.name,
        "inputs": [{"name": "images", "dtype": "float32", "shape": [1, 3, s, s]}],
        "outputs": [
            {"name": "boxes", "dtype": "float32", "shape": ["num_detections", 4]},
            {"name": "labels", "dtype": "int64", "shape": ["num_detections"]},
            {"name": "scores", "dtype": "float32", "shape": ["num_detections"]},
            {"name": "masks", "dtype": "float32", "shape": ["num_detections", 1, s, s]},
        ],
        "precision": "fp32",
        "parity": parity,
        "variants": {},
        "image": _image_spec(pre, cfg, model.backbone.body.patch_size),
        "classes": list(classes),
        "score_threshold": score_threshold,
        **(
            {}
            if nms_iou_threshold is None
            else {"nms_iou_threshold": nms_iou_threshold, "nms": "class_agnostic"}
        ),
        **_scenes_entry(pre),
        "source_sha256": sha256_file(head),
    }
