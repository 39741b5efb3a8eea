"""The fine-tuning protocol: the official classifier trained end to end with layer-wise lr decay.

The classifier pools the pre-norm patch tokens -> fc_norm -> head; training sets the encoder's drop path and
relative position tables (``Encoder.set_drop_path`` / ``init_rel_pos_bias``), light augmentation and
optional mixup/cutmix. With an output directory, every epoch ends with a checkpoint (model, optimizer, data
order and RNG state: ``resume`` continues a cut run exactly), ``metrics.jsonl`` and ``finetune_curve.png``
(train loss and test top-1 per evaluated epoch).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import data as D
from ..checkpointing import load_training_checkpoint, rng_state, set_rng_state
from ..config import ConfigError
from ..files import atomic_torch_save
from ..models.cae import Encoder
from ..optim import cosine_lr, effective_warmup, finetune_param_groups
from ..runtime import autocast
from ..tracking import MetricsWriter, Progress
from ..viz import plot_eval_curve, plot_loss_curve
from .backbone import Backbone
from .common import pct, topk_correct
from .features import DataSpec, count_classes, subset_indices
from .params import EvalError, FinetuneParams

__all__ = ["FINETUNE_CHECKPOINT", "FinetuneClassifier", "random_erase", "run_finetune"]

_logger = logging.getLogger("training.evaluation")

FINETUNE_CHECKPOINT = "finetune-checkpoint.pth"
# parameters that do not change what is trained: a resumed run may set them differently
_RUNTIME_ONLY = ("log_every", "threads", "num_workers", "extract_batch_size", "eval_every", "epochs")


class FinetuneClassifier(nn.Module):
    """The official fine-tuning network: mean of the *pre-norm* patch tokens -> ``fc_norm`` (the
    pretrained final norm, ``encoder.norm`` here) -> Linear head (init scaled by 0.001)."""

    def __init__(self, encoder: Encoder, num_classes: int, init_scale: float = 0.001) -> None:
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


def random_erase(
    x: Tensor,
    rng: np.random.Generator,
    prob: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
    attempts: int = 10,
) -> Tensor:
    """timm's ``RandomErasing(mode='pixel')`` on a normalized batch: each image, with probability
    ``prob``, gets one rectangle of N(0, 1) noise whose area and aspect are drawn as timm draws them (up
    to ``attempts`` tries for a rectangle that fits; none fits: the image is left as is). Vectorized over
    the batch; every draw comes from ``rng``, so a resumed epoch repeats it."""
    b, c, h, w = x.shape
    hit = rng.random(b) < prob
    if not hit.any():
        return x
    # draw all attempts at once, keep the first that fits (timm's loop, in array form)
    target = rng.uniform(area[0], area[1], (b, attempts)) * h * w
    aspect = np.exp(rng.uniform(log_aspect[0], log_aspect[1], (b, attempts)))
    eh = np.round(np.sqrt(target * aspect)).astype(np.int64)
    ew = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (eh < h) & (ew < w)
    first = fits.argmax(axis=1)
    hit &= fits.any(axis=1)
    rows = np.arange(b)
    eh, ew = np.where(hit, eh[rows, first], 0), np.where(hit, ew[rows, first], 0)
    top = (rng.random(b) * (h - eh + 1)).astype(np.int64)
    left = (rng.random(b) * (w - ew + 1)).astype(np.int64)
    ys, xs = np.arange(h), np.arange(w)
    inside = (
        (ys[None, :, None] >= top[:, None, None])
        & (ys[None, :, None] < (top + eh)[:, None, None])
        & (xs[None, None, :] >= left[:, None, None])
        & (xs[None, None, :] < (left + ew)[:, None, None])
    )  # [B, H, W]
    noise = torch.from_numpy(rng.standard_normal((b, c, h, w), dtype=np.float32)).to(x.dtype)
    return torch.where(torch.from_numpy(inside)[:, None], noise, x)


def _augment(
    x: Tensor, y: Tensor, rng: np.random.Generator, p: FinetuneParams, fill: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Random crop with padding (pixel-0 fill) + horizontal flip + optional random erasing, then optional
    batch mixup/cutmix. Returns images and soft targets (label smoothing included)."""
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
    if p.reprob > 0:
        x = random_erase(x, rng, p.reprob)
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


def run_finetune(
    p: FinetuneParams,
    backbone: Backbone,
    spec: DataSpec,
    transform: D.EvalTransform,
    preprocess: dict[str, Any],
    device: torch.device,
    amp: torch.dtype | None,
    seed: int,
    output_dir: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``backbone`` end to end; test top-1/top-5 after the last epoch (and every ``eval_every``
    epochs, in ``curve``). ``output_dir``: per-epoch checkpoint, metrics and PNGs; ``resume`` continues
    from its checkpoint."""
    train_src, test_src = spec.source("train"), spec.source("test")
    nc = count_classes(train_src, test_src, labels=[np.asarray(getattr(train_src, "labels", [0]))])
    train_ds: Dataset = D.TransformedDataset(train_src, transform)
    test_ds: Dataset = D.TransformedDataset(test_src, transform)
    for name, limit in (("train", p.limit_train), ("test", p.limit_test)):
        idx = subset_indices(len(train_ds if name == "train" else test_ds), limit)  # type: ignore[arg-type]
        if idx is not None:
            if name == "train":
                train_ds = Subset(train_ds, idx.tolist())
            else:
                test_ds = Subset(test_ds, idx.tolist())
    n_train, n_test = len(train_ds), len(test_ds)  # type: ignore[arg-type]

    torch.manual_seed(seed)
    encoder = backbone.model().encoder  # ours to modify: nothing else uses the backbone after this
    encoder.set_drop_path(p.drop_path)
    added = encoder.init_rel_pos_bias() if p.rel_pos_bias else 0
    model = FinetuneClassifier(encoder, nc).to(device)
    model.requires_grad_(True)
    groups = finetune_param_groups(model, p.weight_decay, p.layer_decay)
    opt = torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.999), eps=1e-8)
    bs = min(p.batch_size, n_train)
    steps = max(n_train // bs, 1)
    warmup = effective_warmup(p.warmup_epochs, p.epochs)
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
    identity = {
        "backbone": backbone.identity,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "params": {k: v for k, v in dataclasses.asdict(p).items() if k not in _RUNTIME_ONLY},
    }
    curve: list[dict[str, Any]] = []
    start_epoch = 0
    metrics: MetricsWriter | None = None
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsWriter(output_dir, enabled=True, tensorboard=False)
        ckpt_path = output_dir / FINETUNE_CHECKPOINT
        if resume and ckpt_path.exists():
            start_epoch, curve = _restore(ckpt_path, identity, p.epochs, model, opt, gen)
            metrics.truncate_after(start_epoch * steps)
        elif resume:
            _logger.info("resume: no %s in %s, starting fresh", FINETUNE_CHECKPOINT, output_dir)
        elif ckpt_path.exists():
            raise EvalError(f"{ckpt_path} exists: pass --resume to continue it, or another --output-dir")
    progress = Progress("finetune", p.epochs * steps, unit="step", logger=_logger, start=start_epoch * steps)
    loss_mean = 0.0  # set by every epoch; a resumed run has at least one left (_restore checks)
    t_start = time.perf_counter()
    for epoch in range(start_epoch, p.epochs):
        model.train()
        rng = np.random.default_rng([seed, epoch])
        order = torch.randperm(n_train, generator=gen)[: steps * bs].tolist()
        loader = DataLoader(Subset(train_ds, order), batch_size=bs, shuffle=False, num_workers=p.num_workers)
        loss_sum, count = 0.0, 0
        for it, (images, labels) in enumerate(loader):
            lr = cosine_lr(epoch + it / steps, p.lr, p.epochs, warmup, p.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            images, target = _augment(images, torch.as_tensor(labels), rng, p, fill, nc)
            images, target = images.to(device, non_blocking=True), target.to(device)
            with autocast(device, amp):
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
                rate = (done - start_epoch * steps) * bs / max(time.perf_counter() - t_start, 1e-9)
                progress.update(
                    done,
                    extra=f"epoch {epoch + 1}/{p.epochs} loss {loss_sum / count:.4f} lr {lr:.3g} "
                    f"{rate:.1f} img/s",
                    force=True,
                )
                if metrics is not None:
                    metrics.write({"kind": "train", "step": done, "epoch": epoch, "loss": loss_sum / count,
                                   "lr": lr})  # fmt: skip
        loss_mean = loss_sum / max(count, 1)
        last = epoch + 1 == p.epochs
        if last or (p.eval_every and (epoch + 1) % p.eval_every == 0):
            t_eval = time.perf_counter()
            top1, top5 = _evaluate(model, test_ds, p, device, amp, n_test)
            curve.append({"epoch": epoch + 1, "train_loss": round(loss_mean, 6), "top1": top1, "top5": top5})
            _logger.info(
                "fine-tuning epoch %d/%d: train loss %.4f, test top1 %.2f (%.1f s to evaluate)",
                epoch + 1, p.epochs, loss_mean, top1, time.perf_counter() - t_eval,
            )  # fmt: skip
            if metrics is not None:
                metrics.write({"kind": "eval", "step": done, **curve[-1]})
        if output_dir is not None:
            state = {
                "format": "cae-service-finetune",
                "identity": identity,
                "epochs": p.epochs,
                "epoch": epoch + 1,  # epochs complete
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(),
                "order_rng": gen.get_state(),
                "rng": rng_state(),
                "curve": curve,
            }
            atomic_torch_save(state, output_dir / FINETUNE_CHECKPOINT)  # a cut write leaves the last one
            plot_loss_curve(output_dir / "metrics.jsonl", output_dir / "finetune_loss.png")
            plot_eval_curve(curve, output_dir / "finetune_curve.png", f"fine-tuning {backbone.spec}")
    if metrics is not None:
        metrics.close()
    final = curve[-1]
    return {
        "top1": final["top1"],
        "top5": final["top5"],
        "train_loss": round(loss_mean, 6),
        "curve": curve,
        **({"resumed_at_epoch": start_epoch} if start_epoch else {}),
        "n_train": n_train,
        "n_test": n_test,
        "num_classes": nc,
    }


def _evaluate(
    model: nn.Module,
    test_ds: Dataset,
    p: FinetuneParams,
    device: torch.device,
    amp: torch.dtype | None,
    n: int,
) -> tuple[float, float]:
    """Top-1 and top-5 (in %) on the test set; the model is left in train mode."""
    model.eval()
    loader = DataLoader(test_ds, batch_size=p.extract_batch_size, shuffle=False, num_workers=p.num_workers)
    c1 = c5 = 0
    with torch.no_grad():
        for images, labels in loader:
            with autocast(device, amp):
                logits = model(images.to(device))
            k1, k5 = topk_correct(logits.float().cpu(), torch.as_tensor(labels))
            c1, c5 = c1 + k1, c5 + k5
    model.train()
    return pct(c1, n), pct(c5, n)


def _restore(
    path: Path,
    identity: dict[str, Any],
    epochs: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> tuple[int, list[dict[str, Any]]]:
    """Load a fine-tuning checkpoint into ``model``/``opt``/``gen`` and the global RNGs; refuse one of
    another backbone, seed, data or recipe. Returns (epochs complete, the test curve so far)."""
    try:
        state = load_training_checkpoint(path)
    except ConfigError as e:
        raise EvalError(str(e)) from e
    if not isinstance(state, dict) or state.get("format") != "cae-service-finetune":
        raise EvalError(f"{path}: not a fine-tuning checkpoint")
    saved = state["identity"]
    if saved != identity:
        diff = sorted(
            k for k in set(saved) | set(identity) if k != "params" and saved.get(k) != identity.get(k)
        ) + sorted(
            f"params.{k}"
            for k in set(saved["params"]) | set(identity["params"])
            if saved["params"].get(k) != identity["params"].get(k)
        )
        raise EvalError(f"{path} was written by another fine-tuning run (differs in: {', '.join(diff)})")
    done = int(state["epoch"])
    if done >= epochs:
        raise EvalError(f"{path} has {done} epochs complete, epochs={epochs}: nothing left to train")
    if int(state["epochs"]) != epochs:
        _logger.warning("resume: epochs %d -> %d changes the lr schedule from epoch %d on",
                        state["epochs"], epochs, done + 1)  # fmt: skip
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["order_rng"])
    set_rng_state(state["rng"])
    _logger.info("resume: %s, %d/%d epochs complete", path, done, epochs)
    return done, list(state["curve"])
