"""What is evaluated: a checkpoint, run directory or ``random:NAME`` resolved to a lazily built encoder.

Each :class:`Backbone` carries its feature-cache identity and preprocessing; :func:`pixel_backbone` is the
raw-pixel baseline.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import cached_sha256_file
from ..models import CAE, CAEConfig, CheckpointError, create_model, list_models, load_model
from ..models.checkpoint import read_metadata
from ..preprocess import Preprocessing, PreprocessingError
from .params import EvalError

__all__ = ["Backbone", "PixelFeatures", "pixel_backbone", "resolve_backbone"]

_logger = logging.getLogger("training.evaluation")


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


_WEIGHTS_MEMO: dict[tuple[str, int, int], str] = {}


def _weights_identity(path: Path, meta: dict[str, str]) -> str:
    """What keys the feature cache for a checkpoint: for our safetensors files a digest of the weights and
    the model config only (so that changing the metadata, e.g. the default readout, reuses the cached
    features), else the file's sha256."""
    if "config" not in meta:
        return "sha256:" + cached_sha256_file(path)
    st = path.stat()
    key = (f"weights:{path.resolve()}", st.st_size, st.st_mtime_ns)
    if key not in _WEIGHTS_MEMO:
        from safetensors import safe_open

        h = hashlib.sha256(meta["config"].encode())
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in sorted(f.keys()):  # noqa: SIM118 (safe_open has no iterator)
                t = f.get_tensor(name).contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        _WEIGHTS_MEMO[key] = h.hexdigest()
    return "weights:" + _WEIGHTS_MEMO[key]


def _preprocess(meta: dict[str, str], img_size: int) -> dict[str, Any]:
    """Our ``preprocess`` entry, else the training config's dataset, else ImageNet statistics."""
    try:
        return Preprocessing.from_metadata(meta, img_size).to_dict()
    except PreprocessingError as e:
        raise EvalError(str(e)) from e


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
                from ..models.checkpoint import read_foreign_checkpoint

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
        preprocess=_preprocess(meta, cfg.img_size),
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
    from ..config import ConfigError, list_presets, load_config

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
    source = f"preset {name}" if dataset else "imagenet-default"
    return Backbone(
        spec=spec,
        identity=f"random:{name}:{_config_hash(model.cfg)}:seed={seed}",
        cfg=model.cfg,
        preprocess=Preprocessing.for_dataset(dataset, model.cfg.img_size, mean, std, source).to_dict(),
        build=build,
        _model=model,
    )


class PixelFeatures(nn.Module):
    """The raw-pixel baseline as a 'model': the evaluation view flattened, back in [0, 1] (the
    normalization undone), one channel when all channels are equal (gray images stored as RGB)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() * self.std + self.mean
        if (
            x.shape[1] > 1 and float((x - x[:, :1]).abs().max()) < 1e-5
        ):  # (equal up to the normalization's rounding)
            x = x[:, :1]
        return x.flatten(1)
