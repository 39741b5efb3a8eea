"""Export a CAE checkpoint to a model bundle: ONNX graphs + ``spec.json``, each graph checked against PyTorch.

Bundle layout::

    embed.onnx            images [B,3,H,W] float32 (normalized) -> tokens [B,1+N,D] (cls first, final norm)
    reconstruct.onnx      images, mask bool [B,N] (same count per row) -> pred [B,Nm,P] (masked patches,
                          ascending order; P = p*p*C pixels or the token vocabulary)
    embed.fp16.onnx ...   optional lower-precision variants, with their measured error
    weights.bin           the graphs' initializers as ONNX external data, each distinct tensor once
                          (``shared_weights=False`` / ``--no-shared-weights``: self-contained graphs)
    spec.json             everything a server needs, plus sha256 of every file

The exporter refuses to write a bundle whose graphs miss the parity bounds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service.bundle_format import FORMAT, FORMAT_VERSION, min_row_cosine, sha256_file
from training.models import CAE, load_model, parse_readout
from training.models.checkpoint import read_metadata
from training.models.layers import resample_abs_pos_embed

from .dense_export import export_detect, export_segment
from .onnx_common import (
    WEIGHTS_FILE,
    ExportError,
    export_graph,
    ort_session,
    pooled_readouts,
    share_weights,
    validate_spec,
)

__all__ = ["EXPORTER_VERSION", "TASKS", "ExportError", "export_bundle", "validate_spec"]

_logger = logging.getLogger("export")

EXPORTER_VERSION = "0.1.0"
TASKS = ("embed", "reconstruct")

# Parity bounds (fp32 graphs against PyTorch; reduced-precision variants on pooled embeddings).
FP32_MAX_ABS = 1e-4
FP32_MIN_COS = 0.99999
FP16_MIN_COS = 0.999
INT8_MIN_COS = 0.99


class EmbedGraph(nn.Module):
    def __init__(self, model: CAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.forward_embed(images)


class ReconstructGraph(nn.Module):
    def __init__(self, model: CAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        return self.model.forward_pred(images, mask)


def resize_model(model: CAE, image_size: int) -> CAE:
    """The same weights at another input size: the sin-cos tables are resampled bicubically, the rule the
    official downstream code applies to a pretrained table."""
    if image_size == model.cfg.img_size:
        return model
    if image_size % model.cfg.patch_size:
        raise ExportError(
            f"--image-size {image_size} is not a multiple of the patch size {model.cfg.patch_size}"
        )
    if model.cfg.use_rel_pos_bias:
        raise ExportError("models with relative position bias export only at their trained size")
    cfg = type(model.cfg).from_dict({**model.cfg.to_dict(), "img_size": image_size})
    new = CAE(cfg)
    sd = dict(model.state_dict())
    grid = cfg.grid_size
    for key in ("encoder.pos_embed", "rd_pos_embed"):
        if key in sd:
            sd[key] = resample_abs_pos_embed(sd[key], grid)
    new.load_state_dict(sd)
    return new.eval()


@dataclass
class Preprocess:
    size: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bicubic"
    class_names: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.interpolation,
            "color": "rgb",
            "resize_rule": "resize the whole image to size x size (no crop), then scale to [0,1], "
            "then (x-mean)/std",
        }


def preprocess_for(path: Path, model: CAE, image_size: int) -> Preprocess:
    """Normalization the encoder was trained with (``training.preprocess.Preprocessing.from_metadata``: our
    metadata, else the run config, else ImageNet), for ``image_size`` inputs. ``model``: as loaded, at
    its trained size."""
    from training.preprocess import Preprocessing

    p = Preprocessing.from_metadata(read_metadata(path), model.cfg.img_size)
    return Preprocess(image_size, list(p.mean), list(p.std), p.interpolation, p.class_names)


def real_images(pre: Preprocess, n: int = 8) -> np.ndarray | None:
    """A few real, normalized images for parity (Fashion-MNIST test images when installed)."""
    from PIL import Image

    from training import data as D

    try:
        ds = D.FashionMNIST(split="test")
    except D.DataError:
        return None
    imgs = []
    for i in range(n):
        img, _ = ds[i * 997 % len(ds)]
        img = img.resize((pre.size, pre.size), Image.Resampling.BICUBIC)
        x = np.asarray(img, dtype=np.float32) / 255.0
        z = (x - np.array(pre.mean, dtype=np.float32)) / np.array(pre.std, dtype=np.float32)
        imgs.append(z.transpose(2, 0, 1))
    return np.stack(imgs).astype(np.float32)


def _random_mask(b: int, n: int, nm: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((b, n), dtype=bool)
    for i in range(b):
        mask[i, rng.choice(n, nm, replace=False)] = True
    return mask


def check_parity(
    task: str, onnx_path: Path, model: CAE, inputs: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Max abs diff and min per-row cosine of an fp32 graph against PyTorch on each input set."""
    sess = ort_session(onnx_path)
    worst_abs, worst_cos = 0.0, 1.0
    for feed in inputs:
        outs = sess.run(None, feed)
        with torch.no_grad():
            if task == "embed":
                x = torch.from_numpy(feed["images"])
                refs = [model.forward_features(x).numpy(), model.forward_block_readouts(x).numpy()]
            else:
                out = model(torch.from_numpy(feed["images"]), torch.from_numpy(feed["mask"]))
                refs = [out.predictions(model).numpy()]
        if len(outs) != len(refs):
            raise ExportError(f"{onnx_path.name}: {len(outs)} outputs, PyTorch gives {len(refs)}")
        for ours, ref in zip(outs, refs, strict=True):
            if ours.shape != ref.shape:
                raise ExportError(f"{onnx_path.name}: output shape {ours.shape} != PyTorch {ref.shape}")
            worst_abs = max(worst_abs, float(np.abs(ours - ref).max()))
            worst_cos = min(worst_cos, min_row_cosine(ours, ref))
    report = {"max_abs_diff": worst_abs, "min_cosine": worst_cos, "bound_max_abs": FP32_MAX_ABS,
              "bound_min_cosine": FP32_MIN_COS, "inputs": len(inputs)}  # fmt: skip
    if not (worst_abs <= FP32_MAX_ABS and worst_cos >= FP32_MIN_COS):
        raise ExportError(f"{onnx_path.name} misses the fp32 parity bound: {report}")
    return report


def make_variant(
    kind: str, src: Path, dst: Path, ref_path: Path, feeds: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """fp16 (weights and compute, IO kept fp32) or int8 (ONNX Runtime dynamic quantization) of a graph,
    with its cosine to the fp32 graph on pooled embeddings."""
    import onnx

    if kind == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        m16 = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(m16, str(dst))
        bound = FP16_MIN_COS
    elif kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # 7-bit weights (reduce_range): on CPUs without VNNI (AVX2, AVX-512 before VNNI) ORT's u8 x s8
        # kernels sum pairs of products into saturating int16, and full-range weights lose accuracy
        # there (reconstruct cosine 0.985 on an AVX2 host); a bundle may be served on such a CPU whatever
        # CPU exported it, so the int8 graphs are made portable by construction
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, reduce_range=True)
        bound = INT8_MIN_COS
    else:
        raise ExportError(f"unknown variant {kind}")
    ref, low = ort_session(ref_path), ort_session(dst)
    worst = 1.0
    for feed in feeds:
        a, b = ref.run(None, feed), low.run(None, feed)
        if "mask" in feed:  # reconstruct: what the route returns, per masked patch
            worst = min(worst, min_row_cosine(a[0], b[0]))
        else:  # embed: every readout /embed serves, the worst of them
            worst = min(
                worst,
                *(min_row_cosine(x, y) for x, y in zip(pooled_readouts(a), pooled_readouts(b), strict=True)),
            )
    report: dict[str, Any] = {"min_cosine_pooled": worst, "bound_min_cosine": bound}
    if kind == "int8":
        report["weights"] = "int8, 7-bit range (reduce_range)"
    if worst < bound:
        raise ExportError(f"{dst.name} misses its bound: cosine {worst:.6f} < {bound}")
    return report


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    tasks: tuple[str, ...] = TASKS,
    image_size: int | None = None,
    opset: int = 18,
    fp16: bool = False,
    int8: bool = False,
    seed: int = 0,
    segment: str | Path | None = None,
    detect: str | Path | None = None,
    scenes_root: str | Path | None = None,
    detect_score_threshold: float = 0.5,
    detect_nms_iou: float | None = 0.5,
    shared_weights: bool = True,
) -> dict[str, Any]:
    """Write a bundle for ``checkpoint`` into ``out_dir`` and return its spec. ``segment`` / ``detect``:
    trained dense heads (``training/run.py segment|detect``) to add as ``segment.onnx`` / ``detect.onnx``;
    ``scenes_root``: a scenes benchmark folder whose validation images join the parity inputs;
    ``shared_weights``: every graph's weights in one ``weights.bin``, each tensor once (parity is checked
    on the self-contained graphs first; the move keeps the weights bit for bit, which is verified)."""
    t0 = time.perf_counter()
    checkpoint = Path(checkpoint)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ExportError(f"unknown tasks {unknown}; available: {list(TASKS)}")
    model = load_model(checkpoint)
    size = image_size or model.cfg.img_size
    pre = preprocess_for(checkpoint, model, size)
    model = resize_model(model, size)
    if "reconstruct" in tasks and model.cfg.encoder_only:
        raise ExportError(
            "reconstruct needs a pretraining checkpoint (this one is encoder-only); use --tasks embed"
        )
    default_pooling = read_metadata(checkpoint).get("readout") or "cls"  # the readout the model card measured
    parse_readout(default_pooling, model.cfg.depth)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    rng = np.random.default_rng(seed)
    real = real_images(pre)
    default_ratio = 0.5
    nm = max(1, min(c.num_patches - 1, int(round(default_ratio * c.num_patches))))
    spec_tasks: dict[str, Any] = {}
    for task in tasks:
        path = out / f"{task}.onnx"
        x_exp = torch.from_numpy(rng.standard_normal((2, c.in_chans, size, size)).astype(np.float32))
        fresh = [rng.standard_normal((3, c.in_chans, size, size)).astype(np.float32)]
        if real is not None:
            fresh.append(real)
        if task == "embed":
            export_graph(EmbedGraph(model), (x_exp,), path, ["images"], ["tokens", "block_readouts"], opset)
            feeds = [{"images": x} for x in fresh]
            io = {
                "inputs": [
                    {"name": "images", "dtype": "float32", "shape": ["batch", c.in_chans, size, size]}
                ],
                "outputs": [
                    {
                        "name": "tokens",
                        "dtype": "float32",
                        "shape": ["batch", 1 + c.num_patches, c.embed_dim],
                    },
                    {
                        "name": "block_readouts",
                        "dtype": "float32",
                        "shape": ["batch", c.depth, 2, c.embed_dim],
                    },
                ],
                "poolings": ["cls", "mean", "cls+mean", *(f"last{n}" for n in range(1, c.depth + 1)), "none"],
                "default_pooling": default_pooling,
            }
        else:
            mask_exp = torch.from_numpy(_random_mask(2, c.num_patches, nm, rng))
            export_graph(
                ReconstructGraph(model), (x_exp, mask_exp), path, ["images", "mask"], ["pred"], opset
            )
            # parity also at another mask count than the one traced: the count is dynamic
            feeds = [
                {"images": x, "mask": _random_mask(len(x), c.num_patches, k, rng)}
                for x, k in zip(fresh, (nm, max(1, nm // 2)), strict=False)
            ]
            io = {
                "inputs": [
                    {"name": "images", "dtype": "float32", "shape": ["batch", c.in_chans, size, size]},
                    {"name": "mask", "dtype": "bool", "shape": ["batch", c.num_patches]},
                ],
                "outputs": [
                    {"name": "pred", "dtype": "float32", "shape": ["batch", "num_masked", c.pred_dim]}
                ],
            }
        parity = check_parity(task, path, model, feeds)
        _logger.info(
            "%s: max abs diff %.2e, min cosine %.7f", path.name, parity["max_abs_diff"], parity["min_cosine"]
        )
        entry: dict[str, Any] = {
            "file": path.name,
            **io,
            "precision": "fp32",
            "parity": parity,
            "variants": {},
        }
        for kind, wanted in (("fp16", fp16), ("int8", int8)):
            if wanted:
                vpath = out / f"{task}.{kind}.onnx"
                try:
                    report = make_variant(kind, path, vpath, path, feeds)
                except ExportError as e:
                    # a low-precision variant is optional: one that misses its bound (int8 reconstruct on an
                    # AVX2 host) is left out of this task, and why is recorded; the fp32 graph still ships
                    vpath.unlink(missing_ok=True)
                    entry.setdefault("variants_left_out", {})[kind] = str(e)
                    _logger.warning("%s left out of the bundle: %s", vpath.name, e)
                    continue
                entry["variants"][kind] = {"file": vpath.name, "parity": report}
                _logger.info("%s: min cosine to fp32 %.6f", vpath.name, report["min_cosine_pooled"])
        spec_tasks[task] = entry

    root = Path(scenes_root) if scenes_root else None
    if not 0.0 <= detect_score_threshold <= 1.0:
        raise ExportError(f"detect score threshold must be in [0, 1], got {detect_score_threshold}")
    if detect_nms_iou is not None and not 0.0 <= detect_nms_iou <= 1.0:
        raise ExportError(f"detect NMS IoU threshold must be in [0, 1], got {detect_nms_iou}")
    for name, head in (("segment", segment), ("detect", detect)):
        if head is None:
            continue
        if not Path(head).is_file():
            raise ExportError(f"--{name} {head}: no such file")
        if name == "segment":
            spec_tasks[name] = export_segment(Path(head), out, opset, rng, root)
        else:
            spec_tasks[name] = export_detect(
                Path(head), out, opset, rng, root, detect_score_threshold, detect_nms_iou
            )

    spec: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exporter_version": EXPORTER_VERSION,
        "created_unix": int(time.time()),
        "model": {
            "id": f"{checkpoint.stem}-{sha256_file(checkpoint)[:12]}",
            "source_file": checkpoint.name,
            "source_sha256": sha256_file(checkpoint),
            "config": {k: v for k, v in c.to_dict().items() if k != "extra"},
        },
        "image": {
            **pre.to_dict(),
            "patch_size": c.patch_size,
            "grid": list(c.grid_size),
            "num_patches": c.num_patches,
            "channels": c.in_chans,
        },  # fmt: skip
        "embed_dim": c.embed_dim,
        "target": {
            "type": c.target,
            "pred_dim": c.pred_dim,
            "norm_pix_loss": c.norm_pix_loss,
            "default_mask_ratio": default_ratio,
        },  # fmt: skip
        "class_names": pre.class_names,
        "tasks": spec_tasks,
        "opset": opset,
    }
    if shared_weights:
        names = {e["file"] for e in spec_tasks.values()}
        names |= {v["file"] for e in spec_tasks.values() for v in e["variants"].values()}
        graphs = sorted(out / n for n in names)
        spec["external_data"] = {WEIGHTS_FILE: share_weights(graphs)}
    elif (out / WEIGHTS_FILE).exists():  # a previous shared export's file: not part of this bundle
        (out / WEIGHTS_FILE).unlink()
    shared = [out / n for n in spec.get("external_data", {})]
    spec["files"] = {p.name: sha256_file(p) for p in sorted([*out.glob("*.onnx"), *shared])}
    validate_spec(spec)
    tmp = out / "spec.json.tmp"
    tmp.write_text(json.dumps(spec, indent=2))
    tmp.replace(out / "spec.json")
    _logger.info("wrote bundle %s (%s) in %.1fs", out, ", ".join(spec_tasks), time.perf_counter() - t0)
    return spec
