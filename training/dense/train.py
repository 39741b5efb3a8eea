"""Training and evaluation of the dense heads: config, data, loop, metrics, checkpoints and model file.

    python training/run.py segment|detect --config NAME [--set key=value ...] --output-dir DIR [--resume]

(presets in ``training/configs/dense/``; the config is :mod:`training.dense.config`).

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
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..config import ConfigError, build_dataclass
from ..files import atomic_torch_save, save_safetensors_atomic
from ..models.cae import CAE, CAEConfig
from ..optim import cosine_lr, finetune_param_groups
from ..preprocess import Preprocessing, PreprocessingError
from ..runtime import autocast, resolve_device, resolve_precision, seed_everything
from ..tracking import MetricsWriter, fmt_eta
from .config import (
    DENSE_CONFIG_DIR,
    TASKS,
    DenseConfig,
    list_dense_presets,
    load_dense_config,
)
from .datasets import collate_detection
from .evaluate import evaluate_detection, evaluate_segmentation, save_prediction_grid
from .models import CAEPyramid, CAESegmenter, build_mask_rcnn
from .samples import Augment, DetSamples, SegSamples, SegTransform, limit_dataset

__all__ = [
    "DENSE_CONFIG_DIR",
    "TASKS",
    "DenseConfig",
    "assemble_dense_model",
    "build_dense_model",
    "list_dense_presets",
    "load_dense_config",
    "load_dense_model",
    "train_dense",
]

_logger = logging.getLogger("training.dense")


# ---------------------------------------------------------------------------------------------- model
def assemble_dense_model(cfg: DenseConfig, cae: CAE, num_classes: int) -> nn.Module:
    """Pyramid + head around ``cae``'s encoder (drop path for downstream training, optional freezing)."""
    encoder = cae.encoder
    dpr = torch.linspace(0, cfg.model.drop_path_rate, len(encoder.blocks)).tolist()
    for blk, p in zip(
        encoder.blocks, dpr, strict=True
    ):  # stochastic depth ramp, as downstream recipes set it
        for mod in blk.modules():
            if mod.__class__.__name__ == "DropPath":
                mod.drop_prob = p
    if cfg.model.freeze_encoder:
        encoder.requires_grad_(False)
    try:
        pyramid = CAEPyramid(encoder, cfg.model.img_size, finest_stride=cfg.model.finest_stride)
    except ValueError as e:  # img_size / finest_stride against this encoder's patch size
        m = cfg.model
        raise ConfigError(f"model.img_size={m.img_size}, model.finest_stride={m.finest_stride}: {e}") from e
    if cfg.task == "segment":
        return CAESegmenter(pyramid, num_classes, head=cfg.model.head, channels=cfg.model.channels)
    return build_mask_rcnn(pyramid, num_classes, fpn_channels=cfg.model.channels, size_divisible=1)


def build_dense_model(
    cfg: DenseConfig, num_classes: int, seed: int = 0
) -> tuple[nn.Module, dict[str, Any], str, CAE]:
    """The dense model on a pretrained (or random-init) encoder: (model, preprocess, encoder id, cae)."""
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
    try:
        return resolve_device(cfg.runtime.device)
    except ValueError as e:
        raise ConfigError(f"runtime.device: {e}") from e


# ---------------------------------------------------------------------------------------------- training
def _datasets(cfg: DenseConfig) -> tuple[Any, Any, list[str]]:
    from ..data import DataError
    from .datasets import CocoInstances, SegmentationFolder

    root = Path(cfg.data.root)
    try:
        if cfg.task == "segment":
            tr, va = (
                SegmentationFolder(root / "ade", "training"),
                SegmentationFolder(root / "ade", "validation"),
            )
            classes = list(tr.classes) if tr.classes else [str(i) for i in range(int(_max_label(tr)) + 1)]
        else:
            tr = CocoInstances(
                root / "ade" / "images" / "training", root / "coco" / "annotations" / "instances_train.json"
            )
            va = CocoInstances(
                root / "ade" / "images" / "validation", root / "coco" / "annotations" / "instances_val.json"
            )
            classes = list(tr.classes)
    except DataError as e:
        raise ConfigError(
            f"data.root {root}: {e} (generate the benchmark with `python training/run.py scenes`)"
        ) from e
    return tr, va, classes


def _max_label(ds: Any) -> int:
    m = 0
    for i in range(min(len(ds), 200)):
        lab = ds[i][1]
        m = max(m, int(lab[lab != 255].max(initial=0)))
    return m


def train_dense(cfg: DenseConfig, output_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train a segmentation or detection head (with the encoder, layer-wise lr decay) and evaluate it."""

    from ..viz import plot_loss_curve

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    seed_everything(cfg.runtime.seed)
    device = _device(cfg)
    amp = resolve_precision(cfg.runtime.precision, device)
    src_tr, src_va, classes = _datasets(cfg)
    num_classes = len(classes)
    model, pre, encoder_id, cae = build_dense_model(cfg, num_classes, seed=cfg.runtime.seed)
    scenes_json = Path(cfg.data.root) / "scenes.json"
    if (
        scenes_json.is_file()
    ):  # the generator preset rides along into the bundle spec (export/dense_export.py)
        sj = json.loads(scenes_json.read_text())
        pre["scenes"] = {"version": sj.get("scene_version", "v1"), "settings": sj.get("settings")}
    model.to(device)
    size, mean, std = cfg.model.img_size, list(pre["mean"]), list(pre["std"])
    if cfg.task == "segment":
        ds_tr: Any = SegSamples(
            limit_dataset(src_tr, cfg.data.limit_train),
            SegTransform(size, mean, std, cfg.data.hflip, True, Augment.of(cfg.data)),
            cfg.runtime.seed,
        )
        ds_va: Any = SegSamples(
            limit_dataset(src_va, cfg.data.limit_val),
            SegTransform(size, mean, std, 0.0, False),
            cfg.runtime.seed,
        )
        collate = None
    else:
        ds_tr = DetSamples(
            limit_dataset(src_tr, cfg.data.limit_train),
            size,
            mean,
            std,
            cfg.data.hflip,
            True,
            cfg.runtime.seed,
            Augment.of(cfg.data),
        )
        ds_va = DetSamples(
            limit_dataset(src_va, cfg.data.limit_val), size, mean, std, 0.0, False, cfg.runtime.seed
        )
        collate = collate_detection
    bs = min(cfg.optim.batch_size, len(ds_tr))
    steps = max(len(ds_tr) // bs, 1)
    gen = torch.Generator().manual_seed(cfg.runtime.seed)
    loader_va = DataLoader(
        ds_va, batch_size=bs, shuffle=False, num_workers=cfg.data.num_workers, collate_fn=collate
    )
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
        "%s: %s head on %s (%.2fM params) at %d px, %d classes, %d train / %d val images, "
        "%d epochs x %d steps of %d, lr %.3g layer decay %.3g, device %s",
        cfg.task,
        cfg.model.head,
        cfg.model.checkpoint,
        n_params / 1e6,
        size,
        num_classes,
        len(ds_tr),
        len(ds_va),
        cfg.optim.epochs,
        steps,
        bs,
        cfg.optim.lr,
        cfg.optim.layer_decay,
        device,
    )

    log = MetricsWriter(out, enabled=True, tensorboard=False).write

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
        loader = DataLoader(
            Subset(ds_tr, order),
            batch_size=bs,
            shuffle=False,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            drop_last=True,
        )
        model.train()
        sums: dict[str, float] = {}
        for it, batch in enumerate(loader):
            lr = cosine_lr(epoch + it / steps, sched.lr, sched.epochs, sched.warmup_epochs, sched.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            with autocast(device, amp):
                if cfg.task == "segment":
                    x, y = batch
                    losses = model.loss(x.to(device), y.to(device))
                else:
                    images, targets = batch
                    losses = model(
                        [im.to(device) for im in images],
                        [{k: v.to(device) for k, v in t.items()} for t in targets],
                    )
                    losses = {k: v.float() for k, v in losses.items()}
                    losses["loss"] = sum(losses.values())
            loss = losses["loss"]
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(
                    f"non-finite {cfg.task} loss at epoch {epoch + 1} step {it}; lower optim.lr"
                )
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
                    "%s epoch %d/%d step %d/%d %s lr %.3e %.1f img/s eta %s",
                    cfg.task,
                    epoch + 1,
                    sched.epochs,
                    it + 1,
                    steps,
                    " ".join(f"{k} {v:.4f}" for k, v in terms.items()),
                    lr,
                    rate,
                    fmt_eta(((sched.epochs - start_epoch) * steps - done_steps) * bs / max(rate, 1e-9)),
                )
                log({"kind": "train", "epoch": epoch, "step": step, "lr": lr, "img_per_s": rate, **terms})
        log(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": (epoch + 1) * steps,
                **{k: v / steps for k, v in sums.items()},
            }
        )
        limit = cfg.runtime.time_limit_min
        if limit is not None and epoch == start_epoch and sched.epochs > epoch + 1:
            per_epoch = time.perf_counter() - t_epoch
            # room for the final evaluation (about one epoch's time) inside the box
            fit = (
                epoch + 1 + int(max(limit * 60 - (time.perf_counter() - t_start) - per_epoch, 0) // per_epoch)
            )
            if fit < sched.epochs:
                _logger.warning(
                    "runtime.time_limit_min=%g: %.1f s per epoch, "
                    "shortening the schedule from %d to %d epochs",
                    limit,
                    per_epoch,
                    sched.epochs,
                    fit,
                )
                sched.epochs = max(fit, epoch + 1)
                log(
                    {
                        "kind": "schedule",
                        "epoch": epoch,
                        "epochs": sched.epochs,
                        "seconds_per_epoch": per_epoch,
                    }
                )
        last = epoch == sched.epochs - 1
        if last or (epoch + 1) % max(cfg.runtime.eval_every_epochs, 1) == 0:
            t_eval = time.perf_counter()
            if cfg.task == "segment":
                res = evaluate_segmentation(model, loader_va, num_classes, device, cfg.runtime.precision)
            else:
                res = evaluate_detection(model, loader_va, src_va, device, cfg.model.agnostic_nms_iou)
            _logger.info(
                "%s eval after epoch %d (%.1f s): %s",
                cfg.task,
                epoch + 1,
                time.perf_counter() - t_eval,
                {k: v for k, v in res.items() if k != "per_class_iou"},
            )
            log({"kind": "eval", "epoch": epoch, "step": (epoch + 1) * steps, **res})
            best = res
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "epochs": sched.epochs,
                "generator": gen.get_state(),
                "config": json.dumps(cfg.to_dict()),
            },
            ck_path,
        )
        plot_loss_curve(metrics_path, out / "loss_curve.png")
        if last or (epoch + 1) % max(cfg.runtime.vis_every_epochs, 1) == 0:
            try:  # a picture must never cost the run its model
                save_prediction_grid(
                    model,
                    ds_va,
                    cfg.task,
                    pre,
                    out / f"predictions-{epoch:04d}.png",
                    device,
                    classes=classes,
                    nms_iou=cfg.model.agnostic_nms_iou,
                )
            except Exception:  # noqa: BLE001
                _logger.exception("prediction grid failed")

    final = out / f"{cfg.task}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors_atomic(
        state,
        final,
        metadata={
            "format": "cae-dense",
            "task": cfg.task,
            "dense_config": json.dumps(cfg.to_dict()),
            "classes": json.dumps(classes),
            "preprocess": json.dumps(pre),
            "encoder": encoder_id,
            "encoder_config": json.dumps(cae.cfg.to_dict()),
            "metrics": json.dumps({k: v for k, v in best.items() if k != "per_class_iou"}),
        },
        fsync=True,
    )
    result = {
        "task": cfg.task,
        "model": str(final),
        "epochs": sched.epochs,
        "seconds": round(time.perf_counter() - t_start, 1),
        **best,
    }
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
    cfg: DenseConfig = build_dataclass(DenseConfig, json.loads(meta["dense_config"]), "")
    classes = json.loads(meta["classes"])
    try:
        pre = Preprocessing.from_metadata({"preprocess": meta["preprocess"]}).to_dict()
    except PreprocessingError as e:
        raise ConfigError(f"{path}: {e}") from e
    state = load_file(str(path))
    cae = CAE(CAEConfig.from_dict(json.loads(meta["encoder_config"])))
    model = assemble_dense_model(cfg, cae, len(classes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not match the recorded architecture ({str(e)[:300]})") from e
    return model.eval(), cfg, pre, classes
