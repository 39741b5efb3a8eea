"""Train and evaluate the dense heads: ``python training/run.py segment|detect --config NAME_OR_YAML
[--set key=value ...] --output-dir DIR [--resume]`` (presets in ``training/configs/dense/``).

Same conventions as pretraining: a typed config saved beside and inside every checkpoint, per-step
warmup + cosine lr, log lines with each loss term, lr, images/s and ETA, metrics.jsonl, a loss-curve PNG,
atomic checkpoints with exact-enough resume (model, optimizer, epoch), and a final ``segment.safetensors``
or ``detect.safetensors`` holding the whole dense model with its config, class names and preprocessing
in the header, which ``python -m export onnx --segment/--detect`` turns into bundle graphs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import CONFIG_DIR, ConfigError, _build, _deep_merge, load_preset_dict, parse_overrides
from ..data import normalize, to_tensor
from ..engine import _atomic_torch_save, _fmt_eta
from ..evaluation import _autocast, _lr_at, finetune_param_groups
from ..models.cae import CAE, CAEConfig
from .models import CAEPyramid, CAESegmenter, build_mask_rcnn

_logger = logging.getLogger("training.dense")
DENSE_CONFIG_DIR = CONFIG_DIR / "dense"
TASKS = ("segment", "detect")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class DenseModelSection:
    checkpoint: str = "models/default/model.safetensors"  # ours/official/mmpretrain, or random:PRESET
    head: str = "upernet"  # segment: upernet | linear; detect: maskrcnn
    img_size: int = 64  # the dense task's input size (the position table is interpolated to it)
    channels: int = 64  # UperNet channels, or the FPN width for Mask R-CNN
    drop_path_rate: float = 0.1
    freeze_encoder: bool = False
    # detect: class-agnostic NMS IoU threshold applied to the model's (per-class NMS) outputs in evaluation
    # and prediction grids, as the service applies it (service/dense.py); None: off
    agnostic_nms_iou: float | None = None


@dataclass
class DenseDataSection:
    root: str = "runs/scenes"  # holds ade/ (segment) and coco/ (detect), as `training/run.py scenes` writes
    num_workers: int = 0
    hflip: float = 0.5
    # Training-time augmentation beyond the flip (each off at its default, drawing no random numbers):
    # a random crop of crop_min..1 of each side (geometric: garments zoomed in, cut at the border), and a
    # brightness/contrast/gamma/noise jitter (photometric) with probability `photometric`.
    crop_prob: float = 0.0
    crop_min: float = 1.0
    photometric: float = 0.0
    limit_train: int | None = None
    limit_val: int | None = None


@dataclass
class DenseOptimSection:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    clip_grad: float | None = None


@dataclass
class DenseRuntimeSection:
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    log_every: int = 20
    eval_every_epochs: int = 1
    threads: int | None = None
    vis_every_epochs: int = 5
    # Time box (minutes): after the first epoch the schedule is shortened to the epochs that fit, so the
    # cosine still anneals and the run still evaluates and writes its model. None: no limit.
    time_limit_min: float | None = None


@dataclass
class DenseConfig:
    task: str = "segment"
    model: DenseModelSection = field(default_factory=DenseModelSection)
    data: DenseDataSection = field(default_factory=DenseDataSection)
    optim: DenseOptimSection = field(default_factory=DenseOptimSection)
    runtime: DenseRuntimeSection = field(default_factory=DenseRuntimeSection)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def list_dense_presets() -> list[str]:
    return sorted(p.stem for p in DENSE_CONFIG_DIR.glob("*.yaml"))


def load_dense_config(task: str, name_or_path: str | None, overrides: list[str] | None = None) -> DenseConfig:
    data: dict[str, Any] = {}
    if name_or_path:
        path = Path(name_or_path)
        if not path.suffix:
            path = DENSE_CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"no dense preset or file {name_or_path!r}; presets: {list_dense_presets()}")
        data = load_preset_dict(str(path))  # the pretraining presets' reader: YAML errors, `base:` merges
    data = _deep_merge(data, parse_overrides(overrides or []))
    data.setdefault("task", task)
    cfg: DenseConfig = _build(DenseConfig, data, "")
    problems = []
    if cfg.task != task:
        problems.append(f"config task {cfg.task!r} but the command is {task!r}")
    heads = {"segment": ("upernet", "linear"), "detect": ("maskrcnn",)}[task]
    if cfg.model.head not in heads:
        problems.append(f"model.head {cfg.model.head!r} is not a {task} head; use one of {list(heads)}")
    o = cfg.optim
    if o.epochs < 1 or o.batch_size < 1:
        problems.append(f"optim.epochs and optim.batch_size must be >= 1, got {o.epochs}, {o.batch_size}")
    if not 0 < o.lr < 1 or not 0 < o.layer_decay <= 1:
        problems.append(f"need 0 < optim.lr < 1 and 0 < optim.layer_decay <= 1, got {o.lr}, {o.layer_decay}")
    if cfg.runtime.precision not in ("fp32", "bf16"):
        problems.append(f"runtime.precision must be fp32 or bf16, got {cfg.runtime.precision!r}")
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


# ---------------------------------------------------------------------------------------------- data
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


class _SegTransform:
    def __init__(self, size: int, mean: list[float], std: list[float], hflip: float, train: bool,
                 augment: Augment | None = None) -> None:  # fmt: skip
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


class _SegData(Dataset):
    def __init__(self, source: Dataset, transform: _SegTransform, seed: int) -> None:
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img, label = self.source[i]
        return self.transform(img, label, random.Random(hash((self.seed, self.epoch, i))))


class _DetData(Dataset):
    def __init__(self, source: Dataset, size: int, mean: list[float], std: list[float], hflip: float, train: bool,
                 seed: int, augment: Augment | None = None) -> None:  # fmt: skip
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
                boxes = _mask_boxes(masks)
                w, h = img.size
        if (w, h) != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
            boxes = boxes * torch.tensor([self.size / w, self.size / h] * 2)
            masks = torch.nn.functional.interpolate(masks[None].float(), size=(self.size, self.size), mode="nearest")[0]
            masks = masks.to(torch.uint8)
        x = normalize(self.augment.jitter(to_tensor(img), rng), self.mean, self.std)
        if self.train and random.Random(hash((self.seed, self.epoch, i))).random() < self.hflip:
            x, masks = x.flip(-1), masks.flip(-1)
            boxes = torch.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {
            "boxes": boxes,
            "labels": labels,
            "masks": masks,
            "image_id": torch.tensor(int(t["image_id"])),
        }
        return x, target


def _mask_boxes(masks: Tensor) -> Tensor:
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


def _collate_det(batch: list[Any]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    return [b[0] for b in batch], [b[1] for b in batch]


def _limit(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    return Subset(ds, list(range(n)))


# ---------------------------------------------------------------------------------------------- model
def assemble_dense_model(cfg: DenseConfig, cae: CAE, num_classes: int) -> nn.Module:
    """Pyramid + head around ``cae``'s encoder (drop path for downstream training, optional freezing)."""
    encoder = cae.encoder
    dpr = torch.linspace(0, cfg.model.drop_path_rate, len(encoder.blocks)).tolist()
    for blk, p in zip(encoder.blocks, dpr, strict=True):  # stochastic depth ramp, as downstream recipes set it
        for mod in blk.modules():
            if mod.__class__.__name__ == "DropPath":
                mod.drop_prob = p
    if cfg.model.freeze_encoder:
        encoder.requires_grad_(False)
    pyramid = CAEPyramid(encoder, cfg.model.img_size)
    if cfg.task == "segment":
        return CAESegmenter(pyramid, num_classes, head=cfg.model.head, channels=cfg.model.channels)
    return build_mask_rcnn(pyramid, num_classes, fpn_channels=cfg.model.channels, size_divisible=1)


def build_dense_model(cfg: DenseConfig, num_classes: int, seed: int = 0) -> tuple[nn.Module, dict[str, Any], str, CAE]:
    """The dense model on a pretrained (or random-init) encoder. Returns (model, preprocess, encoder id, cae)."""
    from ..evaluation import EvalError, resolve_backbone

    try:
        backbone = resolve_backbone(cfg.model.checkpoint, seed=seed)
        cae = backbone.model()
    except EvalError as e:
        raise ConfigError(f"model.checkpoint: {e}") from e
    pre = dict(backbone.preprocess)
    pre["img_size"] = cfg.model.img_size
    return assemble_dense_model(cfg, cae, num_classes), pre, backbone.identity, cae


# ---------------------------------------------------------------------------------------------- helpers
def _device(cfg: DenseConfig) -> torch.device:
    from ..evaluation import EvalError, _resolve_device

    try:
        return _resolve_device(cfg.runtime.device)
    except EvalError as e:
        raise ConfigError(f"runtime.device: {e}") from e


def _amp(precision: str, device: torch.device) -> torch.dtype | None:
    from ..evaluation import _resolve_precision

    return _resolve_precision(precision, device)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_segmentation(model: CAESegmenter, loader: DataLoader, num_classes: int, device: torch.device,
                          precision: str = "fp32") -> dict[str, Any]:  # fmt: skip
    from .metrics import SegmentationMeter

    model.eval()
    meter = SegmentationMeter(num_classes)
    for x, y in loader:
        with _autocast(device, _amp(precision, device)):
            logits = model(x.to(device))
        meter.update(logits.argmax(1).cpu().numpy(), y.numpy())
    return meter.compute()


def agnostic_nms(out: dict[str, Tensor], iou: float | None) -> dict[str, Tensor]:
    """One image's detections after class-agnostic NMS (torchvision's rule, as the service's numpy one)."""
    if iou is None or len(out["boxes"]) < 2:
        return out
    from torchvision.ops import nms

    keep = nms(out["boxes"].float(), out["scores"].float(), iou)
    return {k: v[keep] for k, v in out.items()}


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader: DataLoader, source: Any, device: torch.device,
                       nms_iou: float | None = None) -> dict[str, Any]:  # fmt: skip
    from .metrics import coco_evaluate, masks_to_rle

    model.eval()
    dets: list[dict[str, Any]] = []
    seen: list[int] = []
    cat_ids = list(source.cat_ids)
    for images, targets in loader:
        outs = [agnostic_nms(o, nms_iou) for o in model([im.to(device) for im in images])]
        for out, tgt in zip(outs, targets, strict=True):
            seen.append(int(tgt["image_id"]))
            boxes = out["boxes"].cpu().numpy()
            masks = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rles = masks_to_rle(masks) if len(masks) else []
            for j in range(len(boxes)):
                x1, y1, x2, y2 = boxes[j].tolist()
                dets.append({
                    "image_id": int(tgt["image_id"]),
                    "category_id": int(cat_ids[int(out["labels"][j]) - 1]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(out["scores"][j]),
                    "segmentation": rles[j],
                })  # fmt: skip
    res = coco_evaluate(source.coco, dets, img_ids=seen)
    res["detections"] = len(dets)
    return res


# ---------------------------------------------------------------------------------------------- visuals
_PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255]],
    dtype=np.uint8,
)  # fmt: skip


def _denorm(x: Tensor, pre: dict[str, Any]) -> np.ndarray:
    m = torch.tensor(pre["mean"]).view(3, 1, 1)
    s = torch.tensor(pre["std"]).view(3, 1, 1)
    return ((x.cpu().float() * s + m).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@torch.no_grad()
def save_prediction_grid(model: nn.Module, ds: Dataset, task: str, pre: dict[str, Any], path: Path,
                         device: torch.device, n: int = 6, scale: int = 3, score_threshold: float = 0.5,
                         classes: list[str] | None = None, nms_iou: float | None = None) -> None:  # fmt: skip
    """PNG rows: image | ground truth | prediction, over a legend of the class colours (training/dense/grid.py).
    Segment: colour label maps; detect: masks, boxes and "<class> <score>" tags of the detections scoring
    above ``score_threshold`` after the class-agnostic NMS at ``nms_iou`` (None: off). ``scale`` is kept
    for callers; tiles are sized by grid.TILE."""
    from .grid import compose_grid, det_tile, seg_tile

    model.eval()
    k = max(len(_PALETTE), 11)
    names = list(classes) if classes else [str(i) for i in range(k)]
    rows = []
    for i in range(min(n, len(ds))):  # type: ignore[arg-type]
        x, y = ds[i]
        img = _denorm(x, pre)
        if task == "segment":
            pred = model(x[None].to(device)).argmax(1)[0].cpu().numpy()
            gt = np.where(y.numpy() == 255, 0, y.numpy())
            rows.append([det_tile(img, np.zeros((0, 4)), [], names), seg_tile(gt), seg_tile(pred)])
        else:
            out = agnostic_nms(model([x.to(device)])[0], nms_iou)
            keep = out["scores"] > score_threshold
            gt_tile = det_tile(img, y["boxes"].numpy(), y["labels"].tolist(), names, None, y["masks"].numpy())
            pr_tile = det_tile(img, out["boxes"][keep].cpu().numpy(), out["labels"][keep].tolist(), names,
                               out["scores"][keep].tolist(), (out["masks"][keep, 0] > 0.5).cpu().numpy())  # fmt: skip
            rows.append([det_tile(img, np.zeros((0, 4)), [], names), gt_tile, pr_tile])
    compose_grid(rows, names, path)


# ---------------------------------------------------------------------------------------------- training
def _datasets(cfg: DenseConfig) -> tuple[Any, Any, list[str]]:
    from ..data import DataError
    from .datasets import CocoInstances, SegmentationFolder

    root = Path(cfg.data.root)
    try:
        if cfg.task == "segment":
            tr, va = SegmentationFolder(root / "ade", "training"), SegmentationFolder(root / "ade", "validation")
            classes = list(tr.classes) if tr.classes else [str(i) for i in range(int(_max_label(tr)) + 1)]
        else:
            tr = CocoInstances(root / "ade" / "images" / "training", root / "coco" / "annotations" / "instances_train.json")
            va = CocoInstances(root / "ade" / "images" / "validation", root / "coco" / "annotations" / "instances_val.json")
            classes = list(tr.classes)
    except DataError as e:
        raise ConfigError(f"data.root {root}: {e} (generate the benchmark with `python training/run.py scenes`)") from e
    return tr, va, classes


def _max_label(ds: Any) -> int:
    m = 0
    for i in range(min(len(ds), 200)):
        lab = ds[i][1]
        m = max(m, int(lab[lab != 255].max(initial=0)))
    return m


def train_dense(cfg: DenseConfig, output_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train a segmentation or detection head (with the encoder, layer-wise lr decay) and evaluate it."""
    from safetensors.torch import save_file

    from ..viz import plot_loss_curve

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    torch.manual_seed(cfg.runtime.seed)
    np.random.seed(cfg.runtime.seed)
    device = _device(cfg)
    amp = _amp(cfg.runtime.precision, device)
    src_tr, src_va, classes = _datasets(cfg)
    num_classes = len(classes)
    model, pre, encoder_id, cae = build_dense_model(cfg, num_classes, seed=cfg.runtime.seed)
    scenes_json = Path(cfg.data.root) / "scenes.json"
    if scenes_json.is_file():  # the generator preset rides along into the bundle spec (export/dense_export.py)
        sj = json.loads(scenes_json.read_text())
        pre["scenes"] = {"version": sj.get("scene_version", "v1"), "settings": sj.get("settings")}
    model.to(device)
    size, mean, std = cfg.model.img_size, list(pre["mean"]), list(pre["std"])
    if cfg.task == "segment":
        ds_tr: Any = _SegData(_limit(src_tr, cfg.data.limit_train),
                              _SegTransform(size, mean, std, cfg.data.hflip, True, Augment.of(cfg.data)), cfg.runtime.seed)  # fmt: skip
        ds_va: Any = _SegData(_limit(src_va, cfg.data.limit_val), _SegTransform(size, mean, std, 0.0, False), cfg.runtime.seed)
        collate = None
    else:
        ds_tr = _DetData(_limit(src_tr, cfg.data.limit_train), size, mean, std, cfg.data.hflip, True, cfg.runtime.seed,
                         Augment.of(cfg.data))  # fmt: skip
        ds_va = _DetData(_limit(src_va, cfg.data.limit_val), size, mean, std, 0.0, False, cfg.runtime.seed)
        collate = _collate_det
    bs = min(cfg.optim.batch_size, len(ds_tr))
    steps = max(len(ds_tr) // bs, 1)
    gen = torch.Generator().manual_seed(cfg.runtime.seed)
    loader_va = DataLoader(ds_va, batch_size=bs, shuffle=False, num_workers=cfg.data.num_workers, collate_fn=collate)
    groups = finetune_param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(0.9, 0.999))

    start_epoch = 0
    resumed_epochs = cfg.optim.epochs
    ck_path = out / "checkpoint.pth"
    if resume and ck_path.is_file():
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        start_epoch = int(ck["epoch"]) + 1
        # a time-boxed schedule stays shortened when the same config resumes; new epochs in the config win
        if json.loads(ck["config"])["optim"]["epochs"] == cfg.optim.epochs:
            resumed_epochs = int(ck.get("epochs", cfg.optim.epochs))
        _logger.info("resumed from %s after epoch %d", ck_path, start_epoch)
    elif resume:
        _logger.info("--resume: no checkpoint in %s, starting fresh", out)
    metrics_path = out / "metrics.jsonl"
    if start_epoch == 0 and metrics_path.exists():
        metrics_path.unlink()
    n_params = sum(p.numel() for p in model.parameters())
    _logger.info(
        "%s: %s head on %s (%.2fM params) at %d px, %d classes, %d train / %d val images, %d epochs x %d steps of %d, "
        "lr %.3g layer decay %.3g, device %s",
        cfg.task, cfg.model.head, cfg.model.checkpoint, n_params / 1e6, size, num_classes, len(ds_tr), len(ds_va),
        cfg.optim.epochs, steps, bs, cfg.optim.lr, cfg.optim.layer_decay, device,
    )  # fmt: skip

    def log(rec: dict[str, Any]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    best: dict[str, Any] = {}
    t_start = time.perf_counter()
    done_steps = 0
    # its epochs may shrink under runtime.time_limit_min (and stay shrunk across a resume)
    sched = dataclasses.replace(cfg.optim, epochs=min(cfg.optim.epochs, resumed_epochs))
    for epoch in range(start_epoch, cfg.optim.epochs):
        if epoch >= sched.epochs:
            break
        t_epoch = time.perf_counter()
        ds_tr.epoch = epoch
        order = torch.randperm(len(ds_tr), generator=gen)[: steps * bs].tolist()
        loader = DataLoader(Subset(ds_tr, order), batch_size=bs, shuffle=False, num_workers=cfg.data.num_workers,
                            collate_fn=collate, drop_last=True)  # fmt: skip
        model.train()
        sums: dict[str, float] = {}
        for it, batch in enumerate(loader):
            lr = _lr_at(epoch + it / steps, sched.lr, sched.epochs, sched.warmup_epochs, sched.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            with _autocast(device, amp):
                if cfg.task == "segment":
                    x, y = batch
                    losses = model.loss(x.to(device), y.to(device))
                else:
                    images, targets = batch
                    losses = model([im.to(device) for im in images],
                                   [{k: v.to(device) for k, v in t.items()} for t in targets])  # fmt: skip
                    losses = {k: v.float() for k, v in losses.items()}
                    losses["loss"] = sum(losses.values())
            loss = losses["loss"]
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"non-finite {cfg.task} loss at epoch {epoch + 1} step {it}; lower optim.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            done_steps += 1
            step = epoch * steps + it + 1
            if step % cfg.runtime.log_every == 0 or it == steps - 1:
                el = time.perf_counter() - t_start
                rate = done_steps * bs / max(el, 1e-9)
                terms = {k: float(v.detach()) for k, v in losses.items()}
                _logger.info(
                    "%s epoch %d/%d step %d/%d %s lr %.3e %.1f img/s eta %s", cfg.task, epoch + 1, sched.epochs,
                    it + 1, steps, " ".join(f"{k} {v:.4f}" for k, v in terms.items()), lr, rate,
                    _fmt_eta(((sched.epochs - start_epoch) * steps - done_steps) * bs / max(rate, 1e-9)),
                )  # fmt: skip
                log({"kind": "train", "epoch": epoch, "step": step, "lr": lr, "img_per_s": rate, **terms})
        log({"kind": "epoch", "epoch": epoch, "step": (epoch + 1) * steps, **{k: v / steps for k, v in sums.items()}})
        limit = cfg.runtime.time_limit_min
        if limit is not None and epoch == start_epoch and sched.epochs > epoch + 1:
            per_epoch = time.perf_counter() - t_epoch
            # room for the final evaluation (about one epoch's time) inside the box
            fit = epoch + 1 + int(max(limit * 60 - (time.perf_counter() - t_start) - per_epoch, 0) // per_epoch)
            if fit < sched.epochs:
                _logger.warning("runtime.time_limit_min=%g: %.1f s per epoch, shortening the schedule from %d to %d epochs",
                                limit, per_epoch, sched.epochs, fit)  # fmt: skip
                sched.epochs = max(fit, epoch + 1)
                log({"kind": "schedule", "epoch": epoch, "epochs": sched.epochs, "seconds_per_epoch": per_epoch})
        last = epoch == sched.epochs - 1
        if last or (epoch + 1) % max(cfg.runtime.eval_every_epochs, 1) == 0:
            t_eval = time.perf_counter()
            if cfg.task == "segment":
                res = evaluate_segmentation(model, loader_va, num_classes, device, cfg.runtime.precision)
            else:
                res = evaluate_detection(model, loader_va, src_va, device, cfg.model.agnostic_nms_iou)
            _logger.info("%s eval after epoch %d (%.1f s): %s", cfg.task, epoch + 1, time.perf_counter() - t_eval,
                         {k: v for k, v in res.items() if k != "per_class_iou"})  # fmt: skip
            log({"kind": "eval", "epoch": epoch, "step": (epoch + 1) * steps, **res})
            best = res
        _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "epochs": sched.epochs,
                      "generator": gen.get_state(), "config": json.dumps(cfg.to_dict())}, ck_path)  # fmt: skip
        plot_loss_curve(metrics_path, out / "loss_curve.png")
        if last or (epoch + 1) % max(cfg.runtime.vis_every_epochs, 1) == 0:
            try:  # a picture must never cost the run its model
                save_prediction_grid(model, ds_va, cfg.task, pre, out / f"predictions-{epoch:04d}.png", device,
                                     classes=classes, nms_iou=cfg.model.agnostic_nms_iou)  # fmt: skip
            except Exception:  # noqa: BLE001
                _logger.exception("prediction grid failed")

    final = out / f"{cfg.task}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(final), metadata={
        "format": "cae-dense",
        "task": cfg.task,
        "dense_config": json.dumps(cfg.to_dict()),
        "classes": json.dumps(classes),
        "preprocess": json.dumps(pre),
        "encoder": encoder_id,
        "encoder_config": json.dumps(cae.cfg.to_dict()),
        "metrics": json.dumps({k: v for k, v in best.items() if k != "per_class_iou"}),
    })  # fmt: skip
    result = {"task": cfg.task, "model": str(final), "epochs": sched.epochs,
              "seconds": round(time.perf_counter() - t_start, 1), **best}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _logger.info("wrote %s: %s", final, {k: v for k, v in result.items() if k != "per_class_iou"})
    return result


def load_dense_model(path: str | Path) -> tuple[nn.Module, DenseConfig, dict[str, Any], list[str]]:
    """A trained dense model from ``segment.safetensors`` / ``detect.safetensors`` (encoder random-init first,
    then every weight from the file: the file is self-contained)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 (safetensors raises several types for damaged files)
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != "cae-dense":
        raise ConfigError(f"{path}: not a dense-head file written by `training/run.py segment|detect`")
    cfg: DenseConfig = _build(DenseConfig, json.loads(meta["dense_config"]), "")
    classes = json.loads(meta["classes"])
    pre = json.loads(meta["preprocess"])
    state = load_file(str(path))
    cae = CAE(CAEConfig.from_dict(json.loads(meta["encoder_config"])))
    model = assemble_dense_model(cfg, cae, len(classes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not match the recorded architecture ({str(e)[:300]})") from e
    return model.eval(), cfg, pre, classes
