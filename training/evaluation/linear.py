"""The linear-probe protocol on cached features: L-BFGS logistic regression, or BN + linear with LARS.

No augmentation: every epoch sees the same evaluation-view features.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import LARS, cosine_lr, effective_warmup
from ..tracking import Progress
from .common import pct, shuffled_batches, topk_correct, vectors
from .features import Split
from .params import LinearParams

__all__ = ["LinearProbe", "run_linear"]

_logger = logging.getLogger("training.evaluation")


class LinearProbe(nn.Module):
    """The official head: BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, C), trunc-normal(0.01) init."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(x))


def run_linear(
    p: LinearParams, tr: Split, te: Split, nc: int, device: torch.device, seed: int
) -> dict[str, Any]:
    """Linear probe on cached features. No augmentation: every epoch sees the same evaluation-view
    features (the official probe uses RandomResizedCrop + flip)."""
    if p.solver == "lbfgs":
        return _run_logistic(p, tr, te, nc, device)
    torch.manual_seed(seed)
    x = torch.from_numpy(vectors(tr, p.feature)).to(device)
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
    warmup = effective_warmup(p.warmup_epochs, p.epochs)
    gen = torch.Generator().manual_seed(seed)
    steps = max(n // bs, 1)
    progress = Progress("linear probe", p.epochs, unit="epoch", logger=_logger)
    loss_mean = 0.0
    for epoch in range(p.epochs):
        probe.train()
        loss_sum, count = 0.0, 0
        for it, idx in enumerate(shuffled_batches(n, bs, gen)):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(epoch + it / steps, lr, p.epochs, warmup, p.min_lr)
            idx = idx.to(device)
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, count = loss_sum + float(loss.detach()), count + 1
        loss_mean = loss_sum / max(count, 1)
        progress.update(epoch + 1, extra=f"loss {loss_mean:.4f} lr {opt.param_groups[0]['lr']:.3g}")
    probe.eval()
    xt = torch.from_numpy(vectors(te, p.feature)).to(device)
    yt = torch.from_numpy(np.asarray(te.features["labels"]))
    with torch.no_grad():
        scores = torch.cat([probe(xt[s : s + 4096]).float().cpu() for s in range(0, xt.shape[0], 4096)])
    c1, c5 = topk_correct(scores, yt)
    return {"top1": pct(c1, len(yt)), "top5": pct(c5, len(yt)), "train_loss": round(loss_mean, 6), "lr": lr}


def _run_logistic(p: LinearParams, tr: Split, te: Split, nc: int, device: torch.device) -> dict[str, Any]:
    """Full-batch L-BFGS multinomial logistic regression on standardized features (deterministic)."""
    x = torch.from_numpy(vectors(tr, p.feature)).to(device, torch.float32)
    y = torch.from_numpy(np.asarray(tr.features["labels"])).to(device)
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], nc, device=device, requires_grad=True)
    b = torch.zeros(nc, device=device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=p.max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )
    state = {"loss": 0.0, "evals": 0}

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * p.l2 * (w * w).sum()
        loss.backward()
        state["loss"], state["evals"] = float(loss.detach()), state["evals"] + 1
        return loss

    opt.step(closure)
    _logger.info("logistic regression: %d evaluations, loss %.5f", state["evals"], state["loss"])
    xt = (torch.from_numpy(vectors(te, p.feature)).to(device, torch.float32) - mean) / std
    yt = torch.from_numpy(np.asarray(te.features["labels"]))
    with torch.no_grad():
        scores = (xt @ w + b).float().cpu()
    c1, c5 = topk_correct(scores, yt)
    return {
        "top1": pct(c1, len(yt)),
        "top5": pct(c5, len(yt)),
        "train_loss": round(state["loss"], 6),
        "lr": 1.0,
    }
