"""PNG outputs people would rather look at: loss curves and reconstruction grids."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

_logger = logging.getLogger(__name__)


def _pyplot(out_path: Path) -> Any:
    """matplotlib.pyplot on the Agg backend, or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _logger.info("matplotlib not installed; skipping %s", out_path)
        return None
    return plt


def _save_figure(plt: Any, fig: Any, out_path: Path) -> Path:
    """Lay out and write ``fig`` to ``out_path`` through a temporary file (a reader never sees half a PNG)."""
    fig.tight_layout()
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path


def plot_loss_curve(metrics_path: Path, out_path: Path) -> Path | None:
    """Loss terms (per logged step) and lr from ``metrics.jsonl`` to a PNG."""
    if not metrics_path.exists():
        return None
    plt = _pyplot(out_path)
    if plt is None:
        return None
    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in recs if r.get("kind") == "train"]
    if not train:
        return None
    steps = [r["step"] for r in train]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "loss_main", "loss_align", "loss_instance"):
        if key in train[0]:
            ax.plot(steps, [r[key] for r in train], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot(steps, [r["lr"] for r in train], color="tab:gray")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("lr")
    ax_lr.grid(alpha=0.3)
    return _save_figure(plt, fig, out_path)


def plot_eval_curve(curve: list[dict[str, Any]], out_path: Path, title: str) -> Path | None:
    """Train loss and test top-1 per evaluated epoch (``{"epoch", "train_loss", "top1"}`` rows) to a PNG."""
    if not curve:
        return None
    plt = _pyplot(out_path)
    if plt is None:
        return None
    epochs = [r["epoch"] for r in curve]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in curve], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss (epoch mean)")
    tops = [r["top1"] for r in curve]
    ax_acc.plot(epochs, tops, marker="o", color="tab:green")
    # label at most ~10 points (long runs' labels overlap): every step-th back from the last, and the best
    step = -(-len(curve) // 10)
    for i in sorted(set(range(len(curve) - 1, -1, -step)) | {tops.index(max(tops))}):
        ax_acc.annotate(
            f"{tops[i]:.2f}",
            (epochs[i], tops[i]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test top-1 (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save_figure(plt, fig, out_path)


def _to_uint8(x: torch.Tensor, mean: Any, std: Any) -> np.ndarray:
    x = x.float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def reconstruction_panel(
    model: Any, images: torch.Tensor, mask: torch.Tensor, mean: Any, std: Any
) -> np.ndarray:
    """Rows of original | masked | reconstruction (+ visible patches pasted back), as uint8 HxWx3."""
    from .models import patchify, unpatchify

    p, grid = model.cfg.patch_size, model.cfg.grid_size
    with torch.no_grad():
        rec = model.reconstruct(images, mask).float()
    masked = patchify(images.float(), p)
    masked[mask] = 0.0
    masked_img = unpatchify(masked, p, grid, model.cfg.in_chans)
    # masked cells shown in gray (0 after de-normalisation would be the mean colour; use mid-gray)
    gray = (0.5 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    cell = mask.view(-1, 1, *grid).float()
    cell = torch.nn.functional.interpolate(cell, scale_factor=p, mode="nearest")
    masked_img = masked_img * (1 - cell) + gray.to(masked_img) * cell
    rows = []
    for i in range(images.shape[0]):
        rows.append(np.concatenate([_to_uint8(t[i], mean, std) for t in (images, masked_img, rec)], axis=1))
    return np.concatenate(rows, axis=0)


def save_reconstruction_grid(
    model: Any, ds: Any, out_path: Path, device: torch.device, amp_dtype: torch.dtype | None, n: int = 8
) -> Path | None:
    """Reconstructions of ``n`` fixed training images with fixed masks (comparable across epochs)."""
    source = getattr(ds, "source", None)
    if source is None or not hasattr(source, "__getitem__") or len(source) == 0:
        return None
    was_training = model.training
    model.eval()
    try:
        old_epoch = ds.epoch
        ds.set_epoch(0)
        hflip, scale = ds.transform.cfg.hflip, ds.transform.cfg.scale
        ds.transform.cfg.hflip, ds.transform.cfg.scale = 0.0, (1.0, 1.0)  # whole image, unflipped
        items = [ds.sample(source[i][0], i) for i in range(min(n, len(source)))]
        ds.transform.cfg.hflip, ds.transform.cfg.scale = hflip, scale
        ds.set_epoch(old_epoch)
        images = torch.stack([it["images"] for it in items]).to(device)
        mask = torch.stack([it["mask"] for it in items]).to(device)
        cfg = ds.transform.cfg
        ctx = (
            torch.autocast(device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else torch.autocast(device.type, enabled=False)
        )
        with ctx:
            panel = reconstruction_panel(model, images, mask, cfg.mean, cfg.std)
        scale_up = max(1, 96 // model.cfg.img_size)
        img = Image.fromarray(panel)
        if scale_up > 1:
            img = img.resize((img.width * scale_up, img.height * scale_up), Image.Resampling.NEAREST)
        img.save(out_path)
        return out_path
    finally:
        model.train(was_training)
