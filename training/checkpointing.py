"""Pretraining checkpoints: atomic writes, the ``latest.json`` pointer, pruning and reading for resume.

A checkpoint ``checkpoint-E-S.pth`` holds the model, optimizer, scaler and RNG state at step S of epoch E.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ConfigError, PretrainConfig
from .files import atomic_torch_save, write_json_atomic
from .models.checkpoint import safe_globals

__all__ = [
    "CKPT_POINTER",
    "find_resume_checkpoint",
    "load_training_checkpoint",
    "prune_checkpoints",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

_logger = logging.getLogger("training")

CKPT_POINTER = "latest.json"


def rng_state() -> dict[str, Any]:
    """Every generator a resumed run must continue: torch (and CUDA), Python, numpy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    core = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu() for k, v in core.state_dict().items()}


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    cfg: PretrainConfig,
    epoch: int,
    step_in_epoch: int,
    steps_per_epoch: int,
    keep_last: int,
    instance_head: nn.Module | None = None,
) -> Path:
    """Write ``checkpoint-E-S.pth`` atomically, point ``latest.json`` at it, prune to ``keep_last``."""
    core = model.module if hasattr(model, "module") else model
    name = f"checkpoint-{epoch:04d}-{step_in_epoch:06d}.pth"
    path = out_dir / name
    obj = {
        "model": _model_state(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,  # the epoch in progress (complete when step_in_epoch == steps_per_epoch)
        "step_in_epoch": step_in_epoch,
        "global_step": epoch * steps_per_epoch + step_in_epoch,
        "rng": rng_state(),
        "config": cfg.to_dict(),
        "model_config": core.cfg.to_dict(),
        "format": "cae-service-train",
    }
    if instance_head is not None:
        obj["instance_head"] = {k: v.detach().cpu() for k, v in instance_head.state_dict().items()}
    # the previous checkpoint and latest.json stay untouched when a write fails (e.g. a full disk)
    atomic_torch_save(obj, path)
    write_json_atomic(
        out_dir / CKPT_POINTER, {"checkpoint": name, "epoch": epoch, "step_in_epoch": step_in_epoch}
    )
    prune_checkpoints(out_dir, steps_per_epoch, keep_last)
    return path


def prune_checkpoints(out_dir: Path, steps_per_epoch: int, keep_last: int) -> None:
    """Keep the last ``keep_last`` epoch-end checkpoints, plus the newest mid-epoch one if it is newer:
    frequent step checkpoints must not push the epoch checkpoints out."""
    ckpts = sorted(out_dir.glob("checkpoint-*.pth"))
    ends = [p for p in ckpts if int(p.stem.split("-")[2]) >= steps_per_epoch]
    keep = set(ends[-keep_last:])
    if ckpts and ckpts[-1] not in keep:
        keep.add(ckpts[-1])  # the resume point
    for p in ckpts:
        if p not in keep:
            p.unlink(missing_ok=True)


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"{path}: cannot read training checkpoint ({type(e).__name__}: {str(e)[:200]})"
        ) from e


def find_resume_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``latest.json`` names, else (pointer missing or damaged) the newest file."""
    pointer = out_dir / CKPT_POINTER
    if pointer.exists():
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
            if (out_dir / name).exists():
                return out_dir / name
        except (json.JSONDecodeError, KeyError):
            _logger.warning("%s is damaged; falling back to the newest checkpoint file", pointer)
    ckpts = sorted(out_dir.glob("checkpoint-*.pth"))
    return ckpts[-1] if ckpts else None
