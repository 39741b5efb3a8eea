"""What every loop optimizes with: the warmup + cosine lr, parameter groups and LARS."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "LARS",
    "cosine_lr",
    "effective_warmup",
    "finetune_param_groups",
    "layer_id_for",
    "param_groups",
]

_logger = logging.getLogger("training")


def cosine_lr(
    t: float,
    base_lr: float,
    total: float,
    warmup: float,
    min_lr: float = 0.0,
    *,
    warmup_to_last_step: bool = False,
) -> float:
    """The per-step lr: a linear warmup from 0, then a half cosine from ``base_lr`` to ``min_lr`` at
    ``total``.

    ``t``, ``total`` and ``warmup`` share one unit: integer steps, or fractional epochs
    (``epoch + it / steps``). ``warmup_to_last_step``: the ramp reaches ``base_lr`` at the last warmup step,
    as ``np.linspace(0, lr, warmup)`` in the official pretraining ``cosine_scheduler``; otherwise at
    ``t == warmup``, as MAE's fine-tuning ``adjust_learning_rate``.
    """
    if t < warmup:
        return base_lr * t / (max(warmup - 1, 1) if warmup_to_last_step else warmup)
    progress = (t - warmup) / max(total - warmup, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def effective_warmup(warmup: float, epochs: int) -> float:
    """A warmup as long as the run would never reach the base lr: shortened to a tenth of the run."""
    if warmup >= epochs:
        _logger.warning(
            "warmup_epochs %.3g >= epochs %d: warming up for %.3g epochs instead", warmup, epochs, epochs / 10
        )
        return epochs / 10
    return warmup


def param_groups(model: nn.Module, weight_decay: float, decay_tokens: bool = True) -> list[dict[str, Any]]:
    """Pretraining groups: decay on tensors with ndim >= 2 (the official rule, which includes the cls and
    mask tokens); ``decay_tokens=False`` exempts the tokens as mmpretrain does. Frozen tensors are left
    out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_token = name.endswith(("cls_token", "mask_token"))
        if p.ndim < 2 or (is_token and not decay_tokens):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
