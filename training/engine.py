"""The pretraining step loop: ``train_one_epoch`` (MAE's shape), with the model, optimizer and lr it uses.

The driver around it (data, resume, checkpoints, final model) is :mod:`training.pretrain`.

One process, or many through ``torchrun`` (DDP, optionally FSDP). The global batch is
``optim.batch_size`` = world size x per-process batch x ``accum_iter``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .config import ConfigError, PretrainConfig
from .models import CAE, create_model
from .optim import cosine_lr, param_groups
from .runtime import Runtime, all_reduce_mean, autocast, cpu_has_amx_or_bf16
from .tracking import MetricsWriter, fmt_eta

__all__ = [
    "Runtime",
    "build_model",
    "build_optimizer",
    "cpu_has_amx_or_bf16",
    "lr_at",
    "param_groups",
    "train_one_epoch",
]

_logger = logging.getLogger("training")


def lr_at(step: int, cfg: PretrainConfig, steps_per_epoch: int) -> float:
    """Per-step schedule of the official ``cosine_scheduler``: linear warmup from 0 to ``lr`` (reached at
    the last warmup step, as ``np.linspace``), then a half cosine to ``min_lr`` over the remaining steps."""
    o = cfg.optim
    warmup = int(o.warmup_epochs * steps_per_epoch)
    total = o.epochs * steps_per_epoch
    return cosine_lr(step, o.lr, total, warmup, o.min_lr, warmup_to_last_step=True)


def compile_blocks(model: nn.Module) -> int:
    """Regional compilation (``runtime.compile``): each transformer block is compiled once and reused; the
    masking gathers around them stay eager (their sizes depend on the mask). Returns the blocks compiled."""
    import torch._dynamo

    from .models.layers import Block, RegressorBlock

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    blocks = [m for m in model.modules() if isinstance(m, Block | RegressorBlock)]
    for mod in blocks:
        mod.compile()
    return len(blocks)


def build_model(cfg: PretrainConfig) -> CAE:
    """The configured CAE: the official random init, or ``model.init_from``'s weights (same architecture)."""
    model = create_model(cfg.model.name, **cfg.model.overrides)
    if cfg.model.init_from:
        from .models import load_model
        from .models.checkpoint import CheckpointError

        try:
            src = load_model(cfg.model.init_from)
        except (CheckpointError, OSError) as e:
            raise ConfigError(f"model.init_from: {e}") from e
        if src.cfg.to_dict() | {"extra": None} != model.cfg.to_dict() | {"extra": None}:
            diff = sorted(
                k for k, v in model.cfg.to_dict().items() if src.cfg.to_dict().get(k) != v and k != "extra"
            )
            raise ConfigError(
                f"model.init_from {cfg.model.init_from}: architecture differs from the config in {diff}"
            )
        model.load_state_dict(src.state_dict())
        _logger.info("initialized from %s", cfg.model.init_from)
    return model


def build_optimizer(
    model: CAE, cfg: PretrainConfig, device: torch.device, extra: nn.Module | None = None
) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.decay_tokens)
    if extra is not None:  # e.g. the instance-level projection head: same decay rule
        for g, more in zip(groups, param_groups(extra, o.weight_decay, o.decay_tokens), strict=True):
            g["params"] = g["params"] + more["params"]
    kwargs: dict[str, Any] = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    try:  # fused AdamW: one kernel for all parameters (CUDA, and CPU in recent torch)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError) as e:
        _logger.info("fused AdamW unavailable on %s (%s); using foreach", device, e)
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def _targets(batch: dict[str, torch.Tensor], model: CAE, tokenizer: nn.Module | None) -> torch.Tensor:
    if model.cfg.target == "pixel":
        return batch["images"]
    if tokenizer is None:
        raise ConfigError("DALL-E targets need data.tokenizer_weights (python -m export convert-tokenizer)")
    with torch.no_grad():
        return tokenizer.get_codebook_indices(batch["tokenizer_images"])


def _check_finite(sums: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    total = sums.get("loss")
    if total is not None and not math.isfinite(float(total)):
        raise FloatingPointError(f"non-finite loss at epoch {epoch} before step {step}; stopping")


def _instance_loss(
    out: Any, model: nn.Module, head: nn.Module, images2: torch.Tensor, cfg: PretrainConfig, amp: Any
) -> dict[str, torch.Tensor]:
    """InfoNCE between the masked view's pooled feature (already encoded by the CAE step) and the pooled
    feature of the second, unmasked view."""
    from .instance import info_nce, masked_view_feature, nn_info_nce

    ic = cfg.instance
    with amp:
        z1 = head(masked_view_feature(out, model, ic.pooling))
        z2 = head(model.forward_readout(images2, ic.pooling))
    # the head carries a support queue exactly when instance.kind is nn_contrastive
    queue = getattr(head, "queue", None)
    if queue is not None:
        loss, acc = nn_info_nce(z1, z2, queue, ic.temperature)
    else:
        loss, acc = info_nce(z1, z2, ic.temperature)
    return {"loss_instance": ic.weight * loss, "instance_acc": acc}


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    epoch: int,
    cfg: PretrainConfig,
    rt: Runtime,
    steps_per_epoch: int,
    start_step: int = 0,
    scaler: torch.amp.GradScaler | None = None,
    tokenizer: nn.Module | None = None,
    writer: MetricsWriter | None = None,
    on_step: Any = None,
    instance_head: nn.Module | None = None,
) -> dict[str, float]:
    """One epoch (from ``start_step`` when resuming mid-epoch). Returns the epoch's mean metrics.

    ``instance_head``: the projection head of the optional instance-level term (``cfg.instance``)."""
    core: CAE = model.module if hasattr(model, "module") else model  # type: ignore[assignment]
    model.train()
    if instance_head is not None:
        instance_head.train()
    # what the gradient clip sees: the model and the instance head, listed once rather than every step
    clipped = list(model.parameters()) + (
        list(instance_head.parameters()) if instance_head is not None else []
    )
    accum = cfg.optim.accum_iter
    sums: dict[str, torch.Tensor] = {}
    count = 0
    t0 = time.perf_counter()
    seen = 0
    per_rank = cfg.optim.batch_size // (rt.world * accum)
    step = start_step
    micro = 0
    amp = autocast(rt.device, rt.amp_dtype)
    # fp32 with DALL-E targets: the vocabulary head runs fused with the loss (never materializing the
    # [B*Nm, 8192] logits, linear_cross_entropy); under autocast the head keeps its low-precision GEMM
    head = not (core.cfg.target == "dalle" and rt.amp_dtype is None)
    keep_blocks = 0
    if instance_head is not None:
        from .instance import instance_readout_blocks

        keep_blocks = instance_readout_blocks(cfg.instance.pooling, core.cfg.depth)
    for batch in loader:
        if step >= steps_per_epoch:
            break
        global_step = epoch * steps_per_epoch + step
        if micro == 0:
            lr = lr_at(global_step, cfg, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
        batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
        target = _targets(batch, core, tokenizer)
        last_micro = micro == accum - 1
        sync = contextlib.nullcontext() if (last_micro or not hasattr(model, "no_sync")) else model.no_sync()
        with sync:
            with amp:
                out = model(batch["images"], batch["mask"], keep_blocks=keep_blocks, head=head)
            losses = core.forward_loss(out, target)
            if instance_head is not None:
                extra = _instance_loss(out, core, instance_head, batch["images2"], cfg, amp)
                losses = {**losses, **extra, "loss": losses["loss"] + extra["loss_instance"]}
            loss = losses["loss"]
            scaled = loss / accum
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        # Running sums stay on the device: reading a loss every step would stall the GPU queue. A non-finite
        # loss at any step makes its sum non-finite, which is checked at every log step and before any save.
        for k, v in losses.items():
            d = v.detach().to(torch.float64)
            sums[k] = sums[k] + d if k in sums else d
        count += 1
        micro += 1
        if micro < accum:
            continue
        micro = 0
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip = cfg.optim.clip_grad
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(clipped, clip if clip else float("inf"))
            if clip or step % cfg.runtime.log_every == 0
            else None
        )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += per_rank * accum * rt.world
        every = cfg.runtime.save_every_steps
        if step % cfg.runtime.log_every == 0 or step == steps_per_epoch or (every and step % every == 0):
            _check_finite(sums, epoch, step)
        if step % cfg.runtime.log_every == 0 or step == steps_per_epoch:
            elapsed = time.perf_counter() - t0
            rate = seen / max(elapsed, 1e-9)
            remaining = (steps_per_epoch - step) + (cfg.optim.epochs - epoch - 1) * steps_per_epoch
            if cfg.runtime.max_steps is not None:  # the run stops there, not at the end of the schedule
                remaining = min(remaining, max(cfg.runtime.max_steps - (epoch * steps_per_epoch + step), 0))
            rec: dict[str, Any] = {
                "kind": "train",
                "epoch": epoch,
                "step": epoch * steps_per_epoch + step,
                "lr": lr,
                **{k: all_reduce_mean(float(v.detach()), rt) for k, v in losses.items()},
                "img_per_s": rate,
            }
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            if rt.is_main:
                terms = " ".join(f"{k} {rec[k]:.4f}" for k in losses)
                _logger.info(
                    "epoch %d/%d step %d/%d %s lr %.3e %.1f img/s eta %s",
                    epoch + 1,
                    cfg.optim.epochs,
                    step,
                    steps_per_epoch,
                    terms,
                    lr,
                    rate,
                    fmt_eta(remaining * cfg.optim.batch_size / max(rate, 1e-9)),
                )
            if writer is not None:
                writer.write(rec)
        if on_step is not None:
            on_step(epoch, step)
        if cfg.runtime.max_steps is not None and epoch * steps_per_epoch + step >= cfg.runtime.max_steps:
            break
    _check_finite(sums, epoch, step)
    means = {k: all_reduce_mean(float(v) / max(count, 1), rt) for k, v in sums.items()}
    means["steps"] = step
    return means
