"""The dense tasks' typed config: sections, presets in ``training/configs/dense/`` and ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CONFIG_DIR, ConfigError, build_dataclass, deep_merge, load_preset_dict, overrides_to_dict

__all__ = [
    "DENSE_CONFIG_DIR",
    "TASKS",
    "DenseConfig",
    "DenseDataSection",
    "DenseModelSection",
    "DenseOptimSection",
    "DenseRuntimeSection",
    "list_dense_presets",
    "load_dense_config",
]

DENSE_CONFIG_DIR = CONFIG_DIR / "dense"
TASKS = ("segment", "detect")


@dataclass
class DenseModelSection:
    checkpoint: str = "models/default/model.safetensors"  # ours/official/mmpretrain, or random:PRESET
    head: str = "upernet"  # segment: upernet | linear; detect: maskrcnn
    img_size: int = 64  # the dense task's input size (the position table is interpolated to it)
    channels: int = 64  # UperNet channels, or the FPN width for Mask R-CNN
    # The pyramid's finest stride in pixels: None = patch/4 (BEiT/CAE's x4 x2 x1 /2 of the grid); patch/2
    # drops one octave (x2 x1 /2 /4), ~2x cheaper per step at patch 4 (the full-resolution level is gone)
    finest_stride: int | None = None
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
    data = deep_merge(data, overrides_to_dict(overrides or []))
    data.setdefault("task", task)
    cfg: DenseConfig = build_dataclass(DenseConfig, data, "")
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
