"""Encoder evaluation: kNN, linear probe, attentive probe and full fine-tuning (spec §5.1-5.3).

    run_eval("runs/fmnist/model.safetensors", "linear")                      # Fashion-MNIST
    run_eval("random:fmnist_cae", "knn", overrides=["k=10"])                   # the random-init baseline
    run_eval("cae_base.pth", "attentive", dataset="imagefolder:/data/in1k")   # PATH/train, PATH/val

The frozen protocols (knn, linear, attentive) extract features once and cache them on disk, keyed by the
checkpoint's sha256 (or the random spec and seed), the dataset, the split, the preprocessing, the
precision and the subset; later runs only train the small head. Hyper-parameters are overridable with
``key=value`` strings (``--set`` on the command line); :func:`allowed_overrides` lists them.

Differences from the official scripts, on purpose:

* linear and attentive probes train on cached features of the *evaluation* view, with no augmentation
  (the official linear probe uses RandomResizedCrop + flip at train time);
* the attentive head works (the released one raises a TypeError) and its BatchNorm uses running
  statistics at test time (the released loop uses batch statistics);
* defaults are sized for small data and a small CPU (epochs, batches), and two learning rates differ:
  linear ``base_lr`` 1.0 (official 0.1 assumes ~7000 LARS steps) and attentive ``lr`` 0.1 (official 0.4
  is for batch 8192). Every one is overridable;
* fine-tuning uses light augmentation (random crop with padding + flip; mixup/cutmix off unless set)
  instead of RandAugment, random erasing and mixup 0.8 / cutmix 1.0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import data as D
from .engine import _fmt_eta
from .models import (
    CAE,
    CAEConfig,
    CheckpointError,
    create_model,
    list_models,
    load_model,
    parse_readout,
    readout_dim,
)
from .models.checkpoint import read_metadata, sha256_file
from .models.layers import CrossAttention, relative_position_index

__all__ = [
    "PROTOCOLS",
    "AttentiveBlock",
    "AttentiveProbe",
    "Backbone",
    "EvalError",
    "FinetuneClassifier",
    "LARS",
    "LinearProbe",
    "allowed_overrides",
    "extract_features",
    "finetune_param_groups",
    "knn_classify",
    "layer_id_for",
    "parse_overrides",
    "resolve_backbone",
    "run_eval",
]

_logger = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linear", "attentive", "finetune")
DEFAULT_CACHE_DIR = Path("~/.cache/cae-service/features")
CACHE_VERSION = 2
_LOG_INTERVAL_S = 20.0


class EvalError(ValueError):
    """A user-facing evaluation problem (checkpoint, protocol, dataset, override); the message says which."""


# ---------------------------------------------------------------------------------------------- params
@dataclass
class CommonParams:
    extract_batch_size: int = 128
    num_workers: int = 0  # the default machine has 2 busy cores: decode in the main process
    limit_train: int | None = None  # a fixed (seed-independent) random subset of N training images
    limit_test: int | None = None
    crop_pct: float | None = None  # None: 0.875 for imagefolder (official 224/256), 1.0 for fashion-mnist
    precision: str = "auto"  # auto (bf16 on AMX/avx512_bf16 CPUs and bf16 GPUs) | bf16 | fp32
    threads: int | None = None  # CPU threads; None: the cores the load average leaves idle (>= 1)


@dataclass
class KnnParams(CommonParams):
    # cls (official: the cls token after the final norm) | mean (mean of the patch tokens after the final
    # norm) | cls+mean (both, concatenated) | lastN (DINOv2: cls and mean of each of the last N blocks);
    # None: the checkpoint's default readout (what /embed serves by default), else cls
    feature: str | None = None
    baseline: bool = True  # also run the same protocol on raw pixels, printed beside the result
    k: int = 20
    temperature: float = 0.07
    chunk_size: int = 1024


@dataclass
class LinearParams(CommonParams):
    feature: str | None = None  # as KnnParams.feature; cls is the official linear-probe feature
    baseline: bool = True  # also run the same protocol on raw pixels
    budget_check: bool = True  # also train with twice the budget: shows whether the probe has converged
    # lbfgs: multinomial logistic regression on standardized features (BN without affine, frozen at the
    # train statistics), full batch, L-BFGS to convergence: a convex problem, so the result does not move
    # with the budget. lars: the official recipe (BN + linear, LARS, epochs below), which on small data
    # stops short of convergence (F-MNIST cls: 84.5 at 100 epochs, 85.3 at 200)
    solver: str = "lbfgs"
    max_iter: int = 500  # lbfgs iterations
    l2: float = 1e-4  # lbfgs: L2 on the weights (on the mean loss), keeps the optimum finite
    epochs: int = 100
    batch_size: int = 1024
    # lr = base_lr x batch / 256 as officially, but base 1.0, not 0.1: LARS (trust 0.001) moves the weights
    # by relative steps, and 0.1 is sized for ~7000 steps of batch 16384; small data has a few hundred
    # (F-MNIST 10k, 100 epochs: 0.1 -> 59.2% underfit, 1.0 -> 73.4%, 3.0 -> 74.9%, 30 diverges)
    base_lr: float = 1.0
    warmup_epochs: float = 10
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001


@dataclass
class AttentiveParams(CommonParams):
    epochs: int = 10
    batch_size: int = 256
    # absolute, not scaled by batch. The official 0.4 is for batch 8192; at 256 it is unstable
    # (F-MNIST 10k, 15 epochs: 0.4 -> 66.6%, 0.1 -> 79.2%, 0.03 -> 79.1%)
    lr: float = 0.1
    min_lr: float = 1e-6
    warmup_epochs: float = 1
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class FinetuneParams(CommonParams):
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3  # absolute (official base: 8e-3 at batch 4096 for 100 epochs)
    min_lr: float = 1e-6
    warmup_epochs: float = 0.5
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off (official 0.8)
    cutmix: float = 0.0  # Beta(alpha, alpha); 0 = off (official 1.0)
    crop_padding: int | None = None  # random-crop padding in pixels; None: img_size // 8
    hflip: float = 0.5
    rel_pos_bias: bool = True  # official fine-tuning adds a zero-initialized per-block table
    log_every: int = 50


_PARAM_CLASSES: dict[str, type[CommonParams]] = {
    "knn": KnnParams,
    "linear": LinearParams,
    "attentive": AttentiveParams,
    "finetune": FinetuneParams,
}


def allowed_overrides(protocol: str) -> list[str]:
    """The ``key=value`` keys a protocol accepts."""
    if protocol not in _PARAM_CLASSES:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    return sorted(f.name for f in dataclasses.fields(_PARAM_CLASSES[protocol]))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    args = typing.get_args(tp)
    if args and type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or tp is str
    )
    if not ok:
        raise EvalError(f"--set {key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return float(value) if tp is float else str(value) if tp is str else value


def parse_overrides(protocol: str, overrides: Sequence[str] | None) -> CommonParams:
    """``["epochs=5", "lr=0.1"]`` -> the protocol's parameter dataclass (values parsed as YAML)."""
    cls = _PARAM_CLASSES.get(protocol)
    if cls is None:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise EvalError(f"--set expects key=value, got {item!r}")
        if key not in hints:
            raise EvalError(
                f"unknown {protocol} parameter {key!r}; allowed: {', '.join(allowed_overrides(protocol))}"
            )
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise EvalError(f"--set {item!r}: unreadable value ({e})") from e
        values[key] = _coerce(key, value, hints[key])
    params = cls(**values)
    _validate_params(params)
    return params


def _validate_params(p: CommonParams) -> None:
    problems = []
    for name in ("extract_batch_size", "epochs", "batch_size", "k", "chunk_size", "log_every"):
        if hasattr(p, name) and getattr(p, name) < 1:
            problems.append(f"{name} must be >= 1")
    for name in ("limit_train", "limit_test"):
        if getattr(p, name) is not None and getattr(p, name) < 1:
            problems.append(f"{name} must be >= 1 (or null)")
    if p.threads is not None and p.threads < 1:
        problems.append("threads must be >= 1 (or null)")
    if p.num_workers < 0:
        problems.append("num_workers must be >= 0")
    if p.crop_pct is not None and not 0 < p.crop_pct <= 1:
        problems.append("crop_pct must be in (0, 1]")
    if p.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"precision must be auto|bf16|fp32, got {p.precision!r}")
    for name in ("lr", "base_lr", "temperature"):
        if hasattr(p, name) and getattr(p, name) <= 0:
            problems.append(f"{name} must be > 0")
    feature = getattr(p, "feature", None)
    if feature is not None:
        try:
            parse_readout(feature, 10**6)  # the depth bound is checked once the checkpoint is known
        except ValueError:
            problems.append(f"feature must be cls, mean, cls+mean or lastN (e.g. last4), got {feature!r}")
    if isinstance(p, LinearParams) and (p.solver not in ("lbfgs", "lars") or p.max_iter < 1 or p.l2 < 0):
        problems.append(f"solver must be lbfgs or lars (got {p.solver!r}), max_iter >= 1, l2 >= 0")
    if isinstance(p, FinetuneParams) and not 0 < p.layer_decay <= 1:
        problems.append("layer_decay must be in (0, 1]")
    if problems:
        raise EvalError("invalid parameters: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- backbone
@dataclass
class Backbone:
    """A checkpoint resolved far enough to key the cache; the weights load only when needed."""

    spec: str
    identity: str  # sha256 of the file, or random:<name>:<config hash>:seed=<seed>
    cfg: CAEConfig
    preprocess: dict[str, Any]  # img_size, mean, std, interpolation, source
    build: Callable[[], CAE]
    _model: CAE | None = field(default=None, repr=False)
    readout: str | None = None  # the checkpoint's default readout (metadata ``readout``), served by /embed

    def model(self) -> CAE:
        if self._model is None:
            self._model = self.build().eval()
        return self._model


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def _weights_identity(path: Path, meta: dict[str, str]) -> str:
    """What keys the feature cache for a checkpoint: for our safetensors files a digest of the weights and
    the model config only (so that changing the metadata, e.g. the default readout, reuses the cached
    features), else the file's sha256."""
    if "config" not in meta:
        return "sha256:" + _file_sha256(path)
    st = path.stat()
    key = (f"weights:{path.resolve()}", st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        from safetensors import safe_open

        h = hashlib.sha256(meta["config"].encode())
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in sorted(f.keys()):  # noqa: SIM118 (safe_open has no iterator)
                t = f.get_tensor(name).contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        _SHA_MEMO[key] = h.hexdigest()
    return "weights:" + _SHA_MEMO[key]


def _stats_for(
    dataset: str, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    m, s = D.normalization_for(dataset, mean, std)
    return list(m), list(s)


def _preprocess_from_metadata(meta: dict[str, str], img_size: int) -> dict[str, Any]:
    """Our ``preprocess`` entry, else the training config's dataset, else ImageNet statistics."""
    if "preprocess" in meta:
        try:
            pre = json.loads(meta["preprocess"])
            out = {
                "img_size": img_size,
                "mean": [float(v) for v in pre["mean"]],
                "std": [float(v) for v in pre["std"]],
                "interpolation": str(pre.get("interpolation", "bicubic")),
                "source": "metadata.preprocess",
            }
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise EvalError(f"unreadable 'preprocess' metadata in the checkpoint ({e})") from e
        if pre.get("img_size") not in (None, img_size):
            _logger.warning(
                "preprocess img_size %s differs from the model's %d; using the model's",
                pre["img_size"],
                img_size,
            )
        return out
    if "run_config" in meta:
        try:
            data = json.loads(meta["run_config"]).get("data", {})
            mean, std = _stats_for(str(data.get("dataset", "")), data.get("mean"), data.get("std"))
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise EvalError(f"unreadable 'run_config' metadata in the checkpoint ({e})") from e
        return {
            "img_size": img_size,
            "mean": mean,
            "std": std,
            "interpolation": "bicubic",
            "source": "metadata.run_config",
        }
    return {
        "img_size": img_size,
        "mean": list(D.IMAGENET_MEAN),
        "std": list(D.IMAGENET_STD),
        "interpolation": "bicubic",
        "source": "imagenet-default",
    }


def _config_hash(cfg: CAEConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_backbone(checkpoint: str, seed: int = 0) -> Backbone:
    """``random:PRESET_OR_MODEL`` (random init seeded by ``seed``), a path :func:`load_model` reads, or a
    pretraining run directory holding ``model.safetensors``."""
    if checkpoint.startswith("random:"):
        return _resolve_random(checkpoint, checkpoint[len("random:") :], seed)
    path = Path(checkpoint).expanduser()
    if path.is_dir() and (path / "model.safetensors").is_file():  # a pretraining run directory
        path = path / "model.safetensors"
    if not path.is_file():
        raise EvalError(f"checkpoint {checkpoint!r}: no such file (or use random:PRESET_OR_MODEL)")
    try:
        meta = read_metadata(path)
        if "config" in meta:  # ours: the config is in the header, the weights load lazily
            cfg = CAEConfig.from_dict(json.loads(meta["config"]))
            model = None
        else:  # a .pth: ours from a training run (its config inside), or foreign (shapes are the only source)
            model = load_model(path)
            cfg = model.cfg
            if cfg.extra.get("source_flavour") == "ours-train":  # the run's preprocessing, not ImageNet's
                from .models.checkpoint import read_foreign_checkpoint

                meta = {"run_config": json.dumps(read_foreign_checkpoint(path).get("config") or {})}
    except (CheckpointError, json.JSONDecodeError, ValueError) as e:
        raise EvalError(f"cannot read checkpoint {checkpoint!r}: {e}") from e

    def build() -> CAE:
        try:
            return load_model(path)
        except CheckpointError as e:
            raise EvalError(f"cannot load checkpoint {checkpoint!r}: {e}") from e

    return Backbone(
        spec=checkpoint,
        identity=_weights_identity(path, meta),
        cfg=cfg,
        preprocess=_preprocess_from_metadata(meta, cfg.img_size),
        build=build,
        _model=model,
        readout=meta.get("readout"),
    )


def pixel_backbone(like: Backbone) -> Backbone:
    """The raw-pixel baseline at the same input size and preprocessing as ``like``."""
    pre = dict(like.preprocess)
    return Backbone(
        spec="pixels",
        identity="pixels",
        cfg=like.cfg,
        preprocess=pre,
        build=lambda: PixelFeatures(pre["mean"], pre["std"]),  # type: ignore[arg-type,return-value]
    )


def _resolve_random(spec: str, name: str, seed: int) -> Backbone:
    from .config import ConfigError, list_presets, load_config

    if name in list_models():
        model_name, overrides, dataset, mean, std = name, {}, "", None, None
    elif name in list_presets():
        try:
            pc = load_config(name)
        except ConfigError as e:
            raise EvalError(f"{spec}: {e}") from e
        model_name, overrides = pc.model.name, dict(pc.model.overrides)
        dataset, mean, std = pc.data.dataset, pc.data.mean, pc.data.std
    else:
        raise EvalError(
            f"{spec}: unknown model or preset {name!r}; models: {list_models()}; presets: {list_presets()}"
        )

    def build() -> CAE:
        torch.manual_seed(seed)  # the official init draws from the global generator
        try:
            return create_model(model_name, **overrides)
        except ValueError as e:
            raise EvalError(f"{spec}: {e}") from e

    model = build().eval()  # building is the only way to learn the config; keep the weights
    mean_l, std_l = _stats_for(dataset, mean, std)
    return Backbone(
        spec=spec,
        identity=f"random:{name}:{_config_hash(model.cfg)}:seed={seed}",
        cfg=model.cfg,
        preprocess={
            "img_size": model.cfg.img_size,
            "mean": mean_l,
            "std": std_l,
            "interpolation": "bicubic",
            "source": f"preset {name}" if dataset else "imagenet-default",
        },
        build=build,
        _model=model,
    )


# ---------------------------------------------------------------------------------------------- data
@dataclass
class _DataSpec:
    dataset: str
    kind: str  # fashion-mnist | imagefolder
    root: Path | None

    @property
    def default_crop_pct(self) -> float:
        return 1.0 if self.kind == "fashion-mnist" else 0.875

    def source(self, split: str) -> Dataset:
        try:
            return D.build_source(self.dataset, split)
        except (D.DataError, OSError) as e:
            raise EvalError(f"dataset {self.dataset!r} ({split}): {e}") from e


def _parse_dataset(dataset: str) -> _DataSpec:
    kind, _, arg = dataset.partition(":")
    if kind in ("fashion-mnist", "fashion-mnist-shifted"):
        return _DataSpec(dataset, "fashion-mnist", Path(arg).resolve() if arg else D.FMNIST_DIR)
    if kind == "imagefolder":
        if not arg:
            raise EvalError("imagefolder needs a path: imagefolder:PATH (with PATH/train and PATH/val)")
        root = Path(arg).expanduser().resolve()
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise EvalError(f"dataset {dataset!r}: missing {', '.join(str(root / s) for s in missing)}")
        return _DataSpec(f"imagefolder:{root}", kind, root)
    raise EvalError(
        f"unknown dataset {dataset!r}; use fashion-mnist[:ROOT], fashion-mnist-shifted[:ROOT] (test garments "
        "smaller and off-centre) or imagefolder:PATH"
    )


def _source_fingerprint(spec: _DataSpec, source: Dataset) -> str:
    """What identifies a split's content for the cache (file list for image folders)."""
    if spec.kind == "imagefolder":
        h = hashlib.sha256()
        for p, label in source.samples:  # type: ignore[attr-defined]
            h.update(f"{Path(p).relative_to(spec.root)}\t{label}\n".encode())
        return h.hexdigest()[:16]
    shifted = f":shifted{D.ShiftedDataset.SCALE}" if isinstance(source, D.ShiftedDataset) else ""
    return f"{spec.root}:{len(source)}{shifted}"  # type: ignore[arg-type]


def _subset_indices(n: int, limit: int | None) -> np.ndarray | None:
    """A fixed random subset (seed 0, sorted): class-balanced for sorted image folders, cache-friendly."""
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(0).permutation(n)[:limit])


def _num_classes(*sources: Dataset, labels: Sequence[np.ndarray] = ()) -> int:
    names = [getattr(s, "classes", None) for s in sources]
    known = [len(c) for c in names if c]
    if len({tuple(c) for c in names if c}) > 1:
        raise EvalError(f"train and test splits have different classes: {[list(c)[:5] for c in names if c]}")
    from_labels = [int(lab.max()) + 1 for lab in labels if len(lab)]
    return max(known + from_labels + [1])


# ---------------------------------------------------------------------------------------------- runtime
def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EvalError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("device cuda requested but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise EvalError(f"unsupported device {device!r}; use auto, cpu or cuda[:N]")
    return dev


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    from .engine import cpu_has_amx_or_bf16

    fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_amx_or_bf16()
    return torch.bfloat16 if fast_bf16 else None


def _autocast(device: torch.device, amp: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)


@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """Cap the intra-op threads of a training loop. Tiny ops gain nothing from splitting, and on a busy
    CPU the pool's hand-offs cost far more than the work (linear-probe step: 0.3 ms on 1 thread vs 100 ms
    on 2 threads measured on a loaded 2-core machine)."""
    if device.type != "cpu" or threads is None or threads == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _auto_threads(requested: int | None) -> int:
    """Intra-op threads: as requested, else torch's count minus the cores already busy. Oversubscribed
    pools are far slower than one thread (feature extraction on a loaded 2-core CPU: 309 img/s on 1
    thread, 89 img/s on 2)."""
    if requested is not None:
        return requested
    try:
        busy = int(round(os.getloadavg()[0]))
    except OSError:
        busy = 0
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


class _Progress:
    """Rate and ETA log lines, at most every ``_LOG_INTERVAL_S`` seconds (plus the last)."""

    def __init__(self, what: str, total: int, unit: str = "img") -> None:
        self.what, self.total, self.unit = what, total, unit
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < _LOG_INTERVAL_S and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        _logger.info(
            "%s: %d/%d %s (%.1f %s/s, ETA %s)%s",
            self.what,
            done,
            self.total,
            self.unit,
            rate,
            self.unit,
            _fmt_eta(eta),
            f" {extra}" if extra else "",
        )


# ---------------------------------------------------------------------------------------------- features
def _feature_file(readout: str) -> str:
    return "feat-" + readout.replace("+", "_") + ".npy"


class PixelFeatures(nn.Module):
    """The raw-pixel baseline as a 'model': the evaluation view flattened, back in [0, 1] (the
    normalization undone), one channel when all channels are equal (gray images stored as RGB)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() * self.std + self.mean
        if x.shape[1] > 1 and float((x - x[:, :1]).abs().max()) < 1e-5:  # (equal up to the normalization's rounding)
            x = x[:, :1]
        return x.flatten(1)


@torch.no_grad()
def extract_features(
    model: CAE | PixelFeatures,
    dataset: Dataset,
    *,
    tokens: bool = False,
    readouts: Sequence[str] = (),
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    tokens_path: Path | None = None,
    what: str = "extract",
) -> dict[str, np.ndarray]:
    """Frozen features of a ``(tensor, label)`` dataset, in order, from one encoder pass per batch.

    Returns ``cls`` [N, D] float32 (cls token after the final norm, the linear-probe feature), ``labels``
    [N] int64, each readout of ``readouts`` (:meth:`CAE.forward_readouts`) [N, F] float32 and, with
    ``tokens=True``, ``tokens`` [N, 1+Np, D] float16 (every output token after the final norm, written
    into a memory map at ``tokens_path`` when given). For :class:`PixelFeatures`, ``cls`` holds the pixels.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    n = len(dataset)  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    arrays: dict[str, np.ndarray] = {}
    labels = np.empty((n,), dtype=np.int64)
    grid: np.ndarray | None = None
    extra = [r for r in dict.fromkeys(readouts) if r != "cls"]
    progress = _Progress(what, n)
    i = 0
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if isinstance(model, PixelFeatures):
            feats, outs = None, {"cls": model(images)}
        else:
            with _autocast(device, amp_dtype):
                feats, outs = model.forward_readouts(images, ["cls", *extra])
            feats = feats.float()
        b = images.shape[0]
        for name, v in outs.items():
            if name not in arrays:
                arrays[name] = np.empty((n, v.shape[-1]), dtype=np.float32)
            arrays[name][i : i + b] = v.float().cpu().numpy()
        if tokens and feats is not None:
            if grid is None:
                shape = (n, feats.shape[1], feats.shape[2])
                grid = (
                    np.lib.format.open_memmap(tokens_path, mode="w+", dtype=np.float16, shape=shape)
                    if tokens_path is not None
                    else np.empty(shape, dtype=np.float16)
                )
            grid[i : i + b] = feats.to(torch.float16).cpu().numpy()
        labels[i : i + b] = np.asarray(y, dtype=np.int64)
        i += b
        progress.update(i)
    out = {**arrays, "labels": labels}
    if grid is not None:
        if isinstance(grid, np.memmap):
            grid.flush()
        out["tokens"] = grid
    return out


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


@dataclass
class _Split:
    features: dict[str, np.ndarray]  # cls, labels and maybe tokens
    num_classes: int
    cached: bool
    classes: list[str]


def _get_features(
    backbone: Backbone,
    spec: _DataSpec,
    split: str,
    need_tokens: bool,
    readouts: Sequence[str],
    params: CommonParams,
    transform: D.EvalTransform,
    preprocess: dict[str, Any],
    amp: torch.dtype | None,
    device: torch.device,
    cache_dir: Path,
) -> _Split:
    source = spec.source(split)
    limit = params.limit_train if split == "train" else params.limit_test
    key_fields = {
        "version": CACHE_VERSION,
        "model": backbone.identity,
        # the shifted set only changes the test split: its train features are the plain set's
        "dataset": spec.dataset.replace("fashion-mnist-shifted", "fashion-mnist") if split == "train" else spec.dataset,
        "content": _source_fingerprint(spec, source),
        "split": split,
        "preprocess": {k: preprocess[k] for k in ("img_size", "mean", "std", "interpolation", "crop_pct")},
        "precision": "bf16" if amp is not None and backbone.identity != "pixels" else "fp32",
        "limit": limit,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    entry = cache_dir / key
    readouts = [r for r in dict.fromkeys(readouts) if r != "cls"]
    kinds = ["cls", "labels"] + (["tokens"] if need_tokens else []) + readouts
    files = {k: entry / (_feature_file(k) if k in readouts else f"{k}.npy") for k in kinds}
    meta_path = entry / "meta.json"  # written last: its presence marks a complete entry
    if meta_path.exists() and all(p.exists() for p in files.values()):
        _logger.info("%s features (%s): cached in %s", split, "+".join(kinds[:1] + kinds[2:]), entry)
        feats = {k: np.load(p, mmap_mode="r" if k == "tokens" else None) for k, p in files.items()}
        meta = json.loads(meta_path.read_text())
        return _Split(feats, int(meta["num_classes"]), cached=True, classes=list(meta.get("classes") or []))

    idx = _subset_indices(len(source), limit)  # type: ignore[arg-type]
    classes = getattr(source, "classes", None)
    ds: Dataset = D.TransformedDataset(source, transform)
    if idx is not None:
        ds = Subset(ds, idx.tolist())
    entry.mkdir(parents=True, exist_ok=True)
    tmp_tokens = entry / f"tokens.npy.tmp-{os.getpid()}" if need_tokens else None
    kind_name = "+".join(["cls"] + (["tokens"] if need_tokens else []) + readouts)
    _logger.info("extracting %s %s features of %d images with %s", split, kind_name, len(ds), backbone.spec)
    try:
        feats = extract_features(
            backbone.model(),
            ds,
            tokens=need_tokens,
            readouts=readouts,
            batch_size=params.extract_batch_size,
            num_workers=params.num_workers,
            device=device,
            amp_dtype=amp,
            tokens_path=tmp_tokens,
            what=f"extract {split} {kind_name}",
        )
    except BaseException:
        if tmp_tokens is not None:
            tmp_tokens.unlink(missing_ok=True)
        raise
    if tmp_tokens is not None:
        del feats["tokens"]  # close the memory map before renaming it
        os.replace(tmp_tokens, files["tokens"])
        feats["tokens"] = np.load(files["tokens"], mmap_mode="r")
    _save_npy_atomic(entry / "labels.npy", feats["labels"])
    _save_npy_atomic(entry / "cls.npy", feats["cls"])
    for r in readouts:
        _save_npy_atomic(files[r], feats[r])
    nc = _num_classes(source, labels=[feats["labels"]])
    meta = {
        **key_fields,
        "checkpoint": backbone.spec,
        "n": len(ds),
        "num_classes": nc,
        "classes": list(classes or []),
    }
    tmp_meta = meta_path.with_name(f"meta.json.tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    return _Split(feats, nc, cached=False, classes=list(classes or []))


# ---------------------------------------------------------------------------------------------- metrics
def _topk_correct(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    kmax = min(max(ks), scores.shape[1])
    pred = scores.topk(kmax, dim=1).indices
    hit = pred == labels[:, None]
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def _pct(correct: int, n: int) -> float:
    return round(100.0 * correct / max(n, 1), 4)


# ---------------------------------------------------------------------------------------------- knn
@torch.no_grad()
def knn_classify(
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """DINO's weighted kNN: class scores [M, C] from the k most cosine-similar training features, each
    voting exp(sim / T). Features are L2-normalized here; the similarity matmul runs in chunks."""
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    out = torch.empty(test.shape[0], num_classes)
    for s in range(0, test.shape[0], chunk_size):
        sim = test[s : s + chunk_size] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out[s : s + chunk_size] = votes.cpu()
    return out


def _vectors(split: _Split, feature: str) -> np.ndarray:
    """Per-image vectors for kNN / linear: the cached readout (the cls token for the pixel baseline)."""
    return np.asarray(split.features[feature])


def _run_knn(p: KnnParams, tr: _Split, te: _Split, nc: int, device: torch.device) -> dict[str, Any]:
    scores = knn_classify(
        torch.from_numpy(_vectors(tr, p.feature)).to(device),
        torch.from_numpy(tr.features["labels"]).to(device),
        torch.from_numpy(_vectors(te, p.feature)).to(device),
        nc,
        k=p.k,
        temperature=p.temperature,
        chunk_size=p.chunk_size,
    )
    labels = torch.from_numpy(te.features["labels"])
    c1, c5 = _topk_correct(scores, labels)
    return {"top1": _pct(c1, len(labels)), "top5": _pct(c5, len(labels)), "train_loss": None}


# ---------------------------------------------------------------------------------------------- schedule
def _lr_at(epoch: float, base: float, epochs: float, warmup: float, min_lr: float) -> float:
    """MAE's per-step schedule: linear warmup from 0, then a half cosine to ``min_lr``."""
    if epoch < warmup:
        return base * epoch / warmup
    t = (epoch - warmup) / max(epochs - warmup, 1e-12)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def _effective_warmup(warmup: float, epochs: int) -> float:
    if warmup >= epochs:
        _logger.warning(
            "warmup_epochs %.3g >= epochs %d: warming up for %.3g epochs instead", warmup, epochs, epochs / 10
        )
        return epochs / 10
    return warmup


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Shuffled full batches (drop_last as officially); one batch of everything when n < batch."""
    perm = torch.randperm(n, generator=gen)
    bs = min(batch, n)
    for s in range(0, n - bs + 1, bs):
        yield perm[s : s + bs]


# ---------------------------------------------------------------------------------------------- linear
class LARS(torch.optim.Optimizer):
    """LARS as in MAE's ``util/lars.py``: no weight decay or trust-ratio adaptation on <= 1-D params."""

    def __init__(
        self,
        params: Any,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient),
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm, one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


class LinearProbe(nn.Module):
    """The official head: BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, C), trunc-normal(0.01), 0 bias."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(x))


def _run_linear(
    p: LinearParams, tr: _Split, te: _Split, nc: int, device: torch.device, seed: int
) -> dict[str, Any]:
    """Linear probe on cached features. No augmentation: every epoch sees the same evaluation-view
    features (the official probe uses RandomResizedCrop + flip)."""
    if p.solver == "lbfgs":
        return _run_logistic(p, tr, te, nc, device)
    torch.manual_seed(seed)
    x = torch.from_numpy(_vectors(tr, p.feature)).to(device)
    y = torch.from_numpy(np.asarray(tr.features["labels"])).to(device)
    n = x.shape[0]
    probe = LinearProbe(x.shape[1], nc).to(device)
    bs = min(p.batch_size, n)
    lr = p.base_lr * bs / 256
    opt = LARS(
        probe.parameters(),
        lr=lr,
        weight_decay=p.weight_decay,
        momentum=p.momentum,
        trust_coefficient=p.trust_coefficient,
    )
    warmup = _effective_warmup(p.warmup_epochs, p.epochs)
    gen = torch.Generator().manual_seed(seed)
    steps = max(n // bs, 1)
    progress = _Progress("linear probe", p.epochs, unit="epoch")
    loss_mean = 0.0
    for epoch in range(p.epochs):
        probe.train()
        loss_sum, count = 0.0, 0
        for it, idx in enumerate(_batches(n, bs, gen)):
            for g in opt.param_groups:
                g["lr"] = _lr_at(epoch + it / steps, lr, p.epochs, warmup, p.min_lr)
            idx = idx.to(device)
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, count = loss_sum + float(loss.detach()), count + 1
        loss_mean = loss_sum / max(count, 1)
        progress.update(epoch + 1, extra=f"loss {loss_mean:.4f} lr {opt.param_groups[0]['lr']:.3g}")
    probe.eval()
    xt = torch.from_numpy(_vectors(te, p.feature)).to(device)
    yt = torch.from_numpy(np.asarray(te.features["labels"]))
    with torch.no_grad():
        scores = torch.cat([probe(xt[s : s + 4096]).float().cpu() for s in range(0, xt.shape[0], 4096)])
    c1, c5 = _topk_correct(scores, yt)
    return {"top1": _pct(c1, len(yt)), "top5": _pct(c5, len(yt)), "train_loss": round(loss_mean, 6), "lr": lr}


def _run_logistic(p: LinearParams, tr: _Split, te: _Split, nc: int, device: torch.device) -> dict[str, Any]:
    """Full-batch L-BFGS multinomial logistic regression on standardized features (deterministic)."""
    x = torch.from_numpy(_vectors(tr, p.feature)).to(device, torch.float32)
    y = torch.from_numpy(np.asarray(tr.features["labels"])).to(device)
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], nc, device=device, requires_grad=True)
    b = torch.zeros(nc, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=p.max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)  # fmt: skip
    state = {"loss": 0.0, "evals": 0}

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * p.l2 * (w * w).sum()
        loss.backward()
        state["loss"], state["evals"] = float(loss.detach()), state["evals"] + 1
        return loss

    opt.step(closure)
    _logger.info("logistic regression: %d evaluations, loss %.5f", state["evals"], state["loss"])
    xt = (torch.from_numpy(_vectors(te, p.feature)).to(device, torch.float32) - mean) / std
    yt = torch.from_numpy(np.asarray(te.features["labels"]))
    with torch.no_grad():
        scores = (xt @ w + b).float().cpu()
    c1, c5 = _topk_correct(scores, yt)
    return {"top1": _pct(c1, len(yt)), "top5": _pct(c5, len(yt)), "train_loss": round(state["loss"], 6), "lr": 1.0}


# ---------------------------------------------------------------------------------------------- attentive
class AttentiveBlock(nn.Module):
    """The official ``AttentiveBlock``: separate LNs on the query, key and value inputs, then
    cross-attention (q/v biases, zero k bias, output projection). No position term, residual or MLP."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm1_k = nn.LayerNorm(dim, eps=norm_eps)
        self.norm1_v = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        return self.cross_attn(self.norm1_q(x_q), self.norm1_k(x_kv), self.norm1_v(x_kv))


class AttentiveProbe(nn.Module):
    """Learned query [1, 1, D] (zero init) -> AttentiveBlock over all tokens -> BN(affine=False) -> Linear.

    The BatchNorm uses running statistics in eval mode (the released evaluation used batch statistics).
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = AttentiveBlock(dim, num_heads, norm_eps=norm_eps)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        for m in self.block.modules():  # BEiT's _init_weights, which the official model applies
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def pool(self, tokens: Tensor) -> Tensor:
        """[B, T, D] tokens -> [B, D] attention-pooled feature."""
        return self.block(self.query_token.expand(tokens.shape[0], -1, -1), tokens)[:, 0]

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.bn(self.pool(tokens).float()))


def _rows(arr: np.ndarray, idx: np.ndarray) -> Tensor:
    """Rows of a (memory-mapped) array as float32; sorted reads are much faster on a memory map."""
    return torch.from_numpy(np.ascontiguousarray(arr[idx])).float()


def _run_attentive(
    p: AttentiveParams,
    tr: _Split,
    te: _Split,
    nc: int,
    num_heads: int,
    device: torch.device,
    amp: torch.dtype | None,
    seed: int,
) -> dict[str, Any]:
    """Attentive probe on cached token grids (cls + patches after the final norm); no augmentation."""
    torch.manual_seed(seed)
    tokens, labels = tr.features["tokens"], np.asarray(tr.features["labels"])
    n, _, dim = tokens.shape
    probe = AttentiveProbe(dim, num_heads, nc).to(device)
    opt = torch.optim.SGD(
        probe.parameters(), lr=p.lr, momentum=p.momentum, nesterov=True, weight_decay=p.weight_decay
    )
    warmup = _effective_warmup(p.warmup_epochs, p.epochs)
    gen = torch.Generator().manual_seed(seed)
    bs = min(p.batch_size, n)
    steps = max(n // bs, 1)
    progress = _Progress("attentive probe", p.epochs * steps, unit="step")
    loss_mean = 0.0
    for epoch in range(p.epochs):
        probe.train()
        loss_sum, count = 0.0, 0
        for it, idx in enumerate(_batches(n, bs, gen)):
            lr = _lr_at(epoch + it / steps, p.lr, p.epochs, warmup, p.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            rows = np.sort(idx.numpy())  # a batch is a set: sorting changes nothing but the read speed
            xb, yb = _rows(tokens, rows).to(device), torch.from_numpy(labels[rows]).to(device)
            with _autocast(device, amp):
                loss = F.cross_entropy(probe(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, count = loss_sum + float(loss.detach()), count + 1
            progress.update(
                epoch * steps + it + 1,
                extra=f"epoch {epoch + 1}/{p.epochs} loss {loss_sum / count:.4f} lr {lr:.3g}",
            )
        loss_mean = loss_sum / max(count, 1)
    probe.eval()
    test_tokens, yt = te.features["tokens"], torch.from_numpy(np.asarray(te.features["labels"]))
    chunks = []
    with torch.no_grad(), _autocast(device, amp):
        for s in range(0, test_tokens.shape[0], p.batch_size):
            rows = np.arange(s, min(s + p.batch_size, test_tokens.shape[0]))
            chunks.append(probe(_rows(test_tokens, rows).to(device)).float().cpu())
    c1, c5 = _topk_correct(torch.cat(chunks), yt)
    return {"top1": _pct(c1, len(yt)), "top5": _pct(c5, len(yt)), "train_loss": round(loss_mean, 6)}


# ---------------------------------------------------------------------------------------------- finetune
class FinetuneClassifier(nn.Module):
    """The official fine-tuning network: mean of the *pre-norm* patch tokens -> ``fc_norm`` (the
    pretrained final norm, ``encoder.norm`` here) -> Linear head (init scaled by 0.001)."""

    def __init__(self, encoder: nn.Module, num_classes: int, init_scale: float = 0.001) -> None:
        super().__init__()
        self.encoder = encoder
        dim = encoder.cfg.embed_dim
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
            self.head.bias.mul_(init_scale)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.blocks)

    def forward(self, images: Tensor) -> Tensor:
        enc = self.encoder
        x, _ = enc.forward_intermediates(enc.embed(images), None, final_norm=False)
        return self.head(enc.norm(x[:, 1:].mean(dim=1)))


def _set_drop_path(encoder: nn.Module, rate: float) -> None:
    from timm.layers import DropPath

    for blk, r in zip(encoder.blocks, torch.linspace(0, rate, len(encoder.blocks)).tolist(), strict=True):
        blk.drop_path = DropPath(r) if r > 0 else nn.Identity()


def _add_rel_pos_bias(encoder: nn.Module) -> int:
    """Give every block the official zero-initialized relative position table (if it has none)."""
    added = 0
    grid = encoder.cfg.grid_size
    for blk in encoder.blocks:
        attn = blk.attn
        if attn.relative_position_bias_table is not None:
            continue
        num_rel = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        dev = attn.qkv.weight.device
        attn.window_size = grid
        attn.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, attn.num_heads, device=dev))
        attn.register_buffer(
            "relative_position_index", relative_position_index(grid).to(dev), persistent=False
        )
        added += 1
    return added


def layer_id_for(name: str, num_layers: int) -> int:
    """Official layer-wise lr decay ids: 0 for cls_token/pos_embed/patch_embed, i+1 for blocks.i, and
    L+1 for everything else (fc_norm, head)."""
    n = name.removeprefix("encoder.")
    if n in ("cls_token", "mask_token", "pos_embed") or n.startswith("patch_embed."):
        return 0
    if n.startswith("blocks."):
        return int(n.split(".")[1]) + 1
    return num_layers + 1


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups by (layer id, decay): lr scale decay^(L+1-id) with L = ``model.num_layers``; no decay
    on 1-D params, biases, cls_token and position tables. Each group carries ``layer_id``, ``lr_scale`` and
    ``names``. The encoder's parameters are found by the ``encoder.`` in their names wherever it sits
    (a classifier's ``encoder.*``, a dense model's ``backbone.encoder.*``); everything else (necks, heads,
    ``fc_norm``) gets layer id L+1, i.e. the full lr."""
    num_layers = model.num_layers
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        short = name.split("encoder.", 1)[1] if "encoder." in name else None
        no_decay = param.ndim == 1 or name.endswith(".bias") or short in ("cls_token", "pos_embed")
        lid = layer_id_for(short, num_layers) if short is not None else num_layers + 1
        g = groups.setdefault(
            (lid, no_decay),
            {
                "params": [],
                "names": [],
                "layer_id": lid,
                "lr_scale": layer_decay ** (num_layers + 1 - lid),
                "weight_decay": 0.0 if no_decay else weight_decay,
            },
        )
        g["params"].append(param)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _augment(
    x: Tensor, y: Tensor, rng: np.random.Generator, p: FinetuneParams, fill: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Random crop with padding (pixel-0 fill) + horizontal flip, then optional batch mixup/cutmix.
    Returns images and soft targets (label smoothing included)."""
    b, _, h, w = x.shape
    pad = p.crop_padding if p.crop_padding is not None else max(1, h // 8)
    if pad > 0:
        xp = fill.view(1, -1, 1, 1).expand(b, -1, h + 2 * pad, w + 2 * pad).clone()
        xp[:, :, pad : pad + h, pad : pad + w] = x
        oy = torch.from_numpy(rng.integers(0, 2 * pad + 1, b))
        ox = torch.from_numpy(rng.integers(0, 2 * pad + 1, b))
        rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
        cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
        x = xp[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()
    if p.hflip > 0:
        flip = torch.from_numpy(rng.random(b) < p.hflip).view(b, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    off = p.label_smoothing / num_classes
    target = torch.full((b, num_classes), off).scatter_(1, y[:, None], 1.0 - p.label_smoothing + off)
    use_cutmix = p.cutmix > 0 and (p.mixup <= 0 or rng.random() < 0.5)  # timm's switch_prob 0.5
    if use_cutmix:
        lam = float(rng.beta(p.cutmix, p.cutmix))
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1, x0, x1 = (
            max(cy - ch // 2, 0),
            min(cy + ch // 2, h),
            max(cx - cw // 2, 0),
            min(cx + cw // 2, w),
        )
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        target = lam * target + (1.0 - lam) * target.flip(0)
    elif p.mixup > 0:
        lam = float(rng.beta(p.mixup, p.mixup))
        x = lam * x + (1.0 - lam) * x.flip(0)
        target = lam * target + (1.0 - lam) * target.flip(0)
    return x, target


def _run_finetune(
    p: FinetuneParams,
    backbone: Backbone,
    spec: _DataSpec,
    transform: D.EvalTransform,
    preprocess: dict[str, Any],
    device: torch.device,
    amp: torch.dtype | None,
    seed: int,
) -> dict[str, Any]:
    train_src, test_src = spec.source("train"), spec.source("test")
    nc = _num_classes(train_src, test_src, labels=[np.asarray(getattr(train_src, "labels", [0]))])
    train_ds: Dataset = D.TransformedDataset(train_src, transform)
    test_ds: Dataset = D.TransformedDataset(test_src, transform)
    for name, limit in (("train", p.limit_train), ("test", p.limit_test)):
        idx = _subset_indices(len(train_ds if name == "train" else test_ds), limit)  # type: ignore[arg-type]
        if idx is not None:
            if name == "train":
                train_ds = Subset(train_ds, idx.tolist())
            else:
                test_ds = Subset(test_ds, idx.tolist())
    n_train, n_test = len(train_ds), len(test_ds)  # type: ignore[arg-type]

    torch.manual_seed(seed)
    encoder = backbone.model().encoder  # ours to modify: nothing else uses the backbone after this
    _set_drop_path(encoder, p.drop_path)
    added = _add_rel_pos_bias(encoder) if p.rel_pos_bias else 0
    model = FinetuneClassifier(encoder, nc).to(device)
    model.requires_grad_(True)
    groups = finetune_param_groups(model, p.weight_decay, p.layer_decay)
    opt = torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.999), eps=1e-8)
    bs = min(p.batch_size, n_train)
    steps = max(n_train // bs, 1)
    warmup = _effective_warmup(p.warmup_epochs, p.epochs)
    fill = (-torch.tensor(preprocess["mean"]) / torch.tensor(preprocess["std"])).float()
    _logger.info(
        "fine-tuning %s: %d train / %d test images, %d classes, %d epochs x %d steps of %d, lr %.3g, "
        "layer decay %.3g, drop path %.3g%s",
        backbone.spec,
        n_train,
        n_test,
        nc,
        p.epochs,
        steps,
        bs,
        p.lr,
        p.layer_decay,
        p.drop_path,
        f", +rel-pos tables in {added} blocks" if added else "",
    )
    gen = torch.Generator().manual_seed(seed)
    progress = _Progress("finetune", p.epochs * steps, unit="step")
    loss_mean = 0.0
    t_start = time.perf_counter()
    for epoch in range(p.epochs):
        model.train()
        rng = np.random.default_rng([seed, epoch])
        order = torch.randperm(n_train, generator=gen)[: steps * bs].tolist()
        loader = DataLoader(Subset(train_ds, order), batch_size=bs, shuffle=False, num_workers=p.num_workers)
        loss_sum, count = 0.0, 0
        for it, (images, labels) in enumerate(loader):
            lr = _lr_at(epoch + it / steps, p.lr, p.epochs, warmup, p.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            images, target = _augment(images, torch.as_tensor(labels), rng, p, fill, nc)
            images, target = images.to(device, non_blocking=True), target.to(device)
            with _autocast(device, amp):
                logits = model(images)
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            if not math.isfinite(float(loss.detach())):
                raise EvalError(
                    f"fine-tuning diverged (loss {float(loss)}) at epoch {epoch + 1} step {it}; lower lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, count = loss_sum + float(loss.detach()), count + 1
            done = epoch * steps + it + 1
            if done % p.log_every == 0 or done == p.epochs * steps:
                rate = done * bs / max(time.perf_counter() - t_start, 1e-9)
                progress.update(
                    done,
                    extra=f"epoch {epoch + 1}/{p.epochs} loss {loss_sum / count:.4f} lr {lr:.3g} "
                    f"{rate:.1f} img/s",
                    force=True,
                )
        loss_mean = loss_sum / max(count, 1)
    model.eval()
    loader = DataLoader(test_ds, batch_size=p.extract_batch_size, shuffle=False, num_workers=p.num_workers)
    c1 = c5 = 0
    with torch.no_grad():
        for images, labels in loader:
            with _autocast(device, amp):
                logits = model(images.to(device))
            k1, k5 = _topk_correct(logits.float().cpu(), torch.as_tensor(labels))
            c1, c5 = c1 + k1, c5 + k5
    return {
        "top1": _pct(c1, n_test),
        "top5": _pct(c5, n_test),
        "train_loss": round(loss_mean, 6),
        "n_train": n_train,
        "n_test": n_test,
        "num_classes": nc,
    }


# ---------------------------------------------------------------------------------------------- entry
def _dispatch(
    protocol: str,
    params: CommonParams,
    backbone: Backbone,
    spec: _DataSpec,
    transform: D.EvalTransform,
    preprocess: dict[str, Any],
    dev: torch.device,
    amp: torch.dtype | None,
    seed: int,
    cache: Path,
) -> tuple[dict[str, Any], bool | None, int, int, int]:
    """Run one protocol: (result fields, features came from the cache, n_train, n_test, classes)."""
    if protocol == "finetune":
        res = _run_finetune(params, backbone, spec, transform, preprocess, dev, amp, seed)  # type: ignore[arg-type]
        return res, None, res.pop("n_train"), res.pop("n_test"), res.pop("num_classes")
    feature = getattr(params, "feature", None)
    # one encoder pass gives every standard readout for little more than the cls token: cache them
    # together, so that comparing readouts costs one extraction (lastN only as asked, and last4)
    readouts = [feature] if feature else []
    if protocol in ("knn", "linear"):
        readouts = list(dict.fromkeys([*readouts, "mean", "cls+mean", f"last{min(4, backbone.cfg.depth)}"]))
    need_tokens = protocol == "attentive"
    args = (params, transform, preprocess, amp, dev, cache)
    tr = _get_features(backbone, spec, "train", need_tokens, readouts, *args)
    te = _get_features(backbone, spec, "test", need_tokens, readouts, *args)
    if tr.classes and te.classes and tr.classes != te.classes:
        raise EvalError(f"train and test splits have different classes: {tr.classes[:5]} vs {te.classes[:5]}")
    nc = max(tr.num_classes, te.num_classes)
    t_head = time.perf_counter()

    def head(p: CommonParams, a: _Split, b: _Split) -> dict[str, Any]:
        if protocol == "knn":
            return _run_knn(p, a, b, nc, dev)  # type: ignore[arg-type]
        if protocol == "linear":
            with _cpu_threads(dev, 1):  # a [B, D] x [D, C] head: nothing to parallelize
                return _run_linear(p, a, b, nc, dev, seed)  # type: ignore[arg-type]
        return _run_attentive(p, a, b, nc, backbone.cfg.num_heads, dev, amp, seed)  # type: ignore[arg-type]

    res = head(params, tr, te)
    if getattr(params, "budget_check", False):
        more = {"epochs": 2 * params.epochs}  # type: ignore[attr-defined]
        if hasattr(params, "max_iter"):
            more["max_iter"] = 2 * params.max_iter
        doubled = dataclasses.replace(params, **more)  # type: ignore[arg-type]
        res2 = head(doubled, tr, te)
        res["budget_2x"] = {**more, "top1": res2["top1"], "top5": res2["top5"],
                            "delta_top1": round(res2["top1"] - res["top1"], 4)}  # fmt: skip
    if getattr(params, "baseline", False):
        pix = pixel_backbone(backbone)
        ptr = _get_features(pix, spec, "train", False, [], *args)
        pte = _get_features(pix, spec, "test", False, [], *args)
        pparams = dataclasses.replace(params, feature="cls")  # type: ignore[call-arg]
        base = head(pparams, ptr, pte)
        res["baseline_pixels"] = {"top1": base["top1"], "top5": base["top5"], "feature_dim": int(ptr.features["cls"].shape[1])}
    _logger.info("%s head: %.1f s", protocol, time.perf_counter() - t_head)
    return res, tr.cached and te.cached, len(tr.features["labels"]), len(te.features["labels"]), nc


def run_eval(
    checkpoint: str,
    protocol: str,
    dataset: str = "fashion-mnist",
    overrides: list[str] | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate an encoder with one protocol; returns a JSON-serializable dict (``top1``/``top5`` in %).

    ``checkpoint``: a file :func:`load_model` reads, or ``random:PRESET_OR_MODEL`` (random init, seeded).
    ``protocol``: knn | linear | attentive | finetune. ``dataset``: fashion-mnist (train -> test) or
    imagefolder:PATH (PATH/train -> PATH/val). ``overrides``: ``key=value`` hyper-parameters (see
    :func:`allowed_overrides`). Deterministic given ``seed`` for a given device, precision and CPU
    thread count (``threads`` is picked from the load average unless set: pin it to compare runs bitwise).
    """
    t0 = time.perf_counter()
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    params = parse_overrides(protocol, overrides)
    spec = _parse_dataset(dataset)
    dev = _resolve_device(device)
    amp = _resolve_precision(params.precision, dev)
    backbone = resolve_backbone(checkpoint, seed)
    if hasattr(params, "feature"):
        if params.feature is None:  # what /embed serves by default for this checkpoint
            params.feature = backbone.readout or "cls"
        try:
            parse_readout(params.feature, backbone.cfg.depth)
        except ValueError as e:
            raise EvalError(f"feature must be a readout of this {backbone.cfg.depth}-block encoder: {e}") from e
    crop_pct = params.crop_pct if params.crop_pct is not None else spec.default_crop_pct
    preprocess = {**backbone.preprocess, "crop_pct": crop_pct}
    if preprocess["interpolation"] != "bicubic":
        _logger.warning(
            "checkpoint asks for %s resizing; evaluation resizes bicubically", preprocess["interpolation"]
        )
    transform = D.EvalTransform(
        backbone.cfg.img_size, preprocess["mean"], preprocess["std"], crop_pct=crop_pct
    )
    cache = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR.expanduser()
    _logger.info(
        "eval %s on %s with %s (%s, %s)", protocol, spec.dataset, checkpoint, dev, "bf16" if amp else "fp32"
    )

    threads = _auto_threads(params.threads) if dev.type == "cpu" else None
    with _cpu_threads(dev, threads):
        res, cached, n_train, n_test, nc = _dispatch(
            protocol, params, backbone, spec, transform, preprocess, dev, amp, seed, cache
        )
    hp = dataclasses.asdict(params)
    hp["crop_pct"] = crop_pct
    hp["threads"] = threads
    if "warmup_epochs" in hp:
        hp["warmup_epochs"] = hp["warmup_epochs"] if hp["warmup_epochs"] < hp["epochs"] else hp["epochs"] / 10
    if "lr" in res:
        hp["lr"] = res.pop("lr")  # the linear probe's batch-scaled lr
    result = {
        "protocol": protocol,
        "checkpoint": checkpoint,
        "dataset": spec.dataset,
        "top1": res["top1"],
        "top5": res["top5"],
        "train_loss": res["train_loss"],
        "n_train": int(n_train),
        "n_test": int(n_test),
        "num_classes": int(nc),
        "feature": getattr(params, "feature", None),
        "feature_dim": int(readout_dim(params.feature, backbone.cfg.embed_dim, backbone.cfg.depth))
        if getattr(params, "feature", None) else int(backbone.cfg.embed_dim),
        **{k: res[k] for k in ("baseline_pixels", "budget_2x") if k in res},
        "seed": seed,
        "device": str(dev),
        "precision": "bf16" if amp is not None else "fp32",
        "features_cached": cached,
        "preprocess": preprocess,
        "params": hp,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _logger.info(
        "%s top1 %.2f top5 %.2f (%d train / %d test, %.1f s)",
        protocol,
        result["top1"],
        result["top5"],
        n_train,
        n_test,
        result["seconds"],
    )
    if "baseline_pixels" in result:
        _logger.info("%s on raw pixels (same code and split): top1 %.2f", protocol, result["baseline_pixels"]["top1"])
    if "budget_2x" in result:
        b2 = result["budget_2x"]
        _logger.info("%s with twice the epochs (%d): top1 %.2f (%+.2f)", protocol, b2["epochs"], b2["top1"], b2["delta_top1"])
    return result
