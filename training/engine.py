"""The pretraining loop: ``train_one_epoch`` (MAE-style) and ``pretrain`` (setup, resume, checkpoints).

One process, or many through ``torchrun`` (DDP, optionally FSDP). The global batch is
``optim.batch_size`` = world size x per-process batch x ``accum_iter``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from . import data as D
from .config import ConfigError, PretrainConfig
from .models import CAE, create_model, save_model

_logger = logging.getLogger("training")

CKPT_POINTER = "latest.json"


# ---------------------------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def cpu_has_amx_or_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def setup_runtime(cfg: PretrainConfig) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.runtime.device
    use_cuda = torch.cuda.is_available() if want == "auto" else want == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    prec = cfg.runtime.precision
    if prec == "auto":
        prec = "bf16" if (use_cuda and torch.cuda.is_bf16_supported()) or (not use_cuda and cpu_has_amx_or_bf16()) else "fp32"
    if prec == "fp16" and not use_cuda:
        raise ConfigError("runtime.precision=fp16 needs a GPU; use bf16 on CPU")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    return Runtime(device=device, rank=rank, world=world, local_rank=local_rank, amp_dtype=amp)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: PretrainConfig, steps_per_epoch: int) -> float:
    """Per-step schedule of the official ``cosine_scheduler``: linear warmup from 0 to ``lr``, then a
    half cosine to ``min_lr`` over the remaining steps."""
    o = cfg.optim
    warmup = int(o.warmup_epochs * steps_per_epoch)
    total = o.epochs * steps_per_epoch
    if step < warmup:
        # np.linspace(0, lr, warmup)[step]: reaches lr at the last warmup step, as officially
        return o.lr * step / max(warmup - 1, 1)
    t = step - warmup
    n = max(total - warmup, 1)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * t / n))


def param_groups(model: CAE, weight_decay: float, decay_tokens: bool = True) -> list[dict[str, Any]]:
    """Decay on tensors with ndim >= 2 (the official rule, which includes cls/mask tokens);
    ``decay_tokens=False`` exempts the tokens as mmpretrain does. Frozen tensors are left out."""
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


# ---------------------------------------------------------------------------------------------- data
class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (skipping what a checkpoint already consumed).

    The epoch's permutation is ``torch.randperm(n, seed + epoch)`` and rank r takes every world-th index:
    a step's global batch is the same set of samples for any number of processes.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def preprocess_spec(cfg: PretrainConfig, model: CAE) -> dict[str, Any]:
    """How images must be prepared for this encoder (saved in the model file, read by eval/export)."""
    is_fmnist = cfg.data.dataset.startswith("fashion-mnist")
    mean, std = D.normalization_for(cfg.data.dataset, cfg.data.mean, cfg.data.std)
    return {
        "img_size": model.cfg.img_size,
        "mean": list(mean),
        "std": list(std),
        "interpolation": "bicubic",
        "color": "rgb",
        "dataset": cfg.data.dataset.split(":")[0],
        "class_names": list(D.FMNIST_CLASSES) if is_fmnist else None,
    }


def build_pretrain_data(cfg: PretrainConfig, model: CAE, rt: Runtime) -> tuple[Any, DataLoader, int]:
    """Returns (dataset, loader, steps_per_epoch)."""
    d, mc = cfg.data, model.cfg
    mean, std = D.normalization_for(d.dataset, d.mean, d.std)
    tcfg = D.TransformConfig(
        img_size=mc.img_size,
        scale=tuple(d.scale),
        ratio=tuple(d.ratio),
        hflip=d.hflip,
        mean=mean,
        std=std,
        second_size=d.second_size if mc.target == "dalle" else None,
        zoom_out=tuple(d.zoom_out),
        zoom_out_prob=d.zoom_out_prob,
        jitter=d.jitter,
        two_views=cfg.instance.kind != "none",
    )
    num_mask = int(round(d.mask_ratio * mc.num_patches))
    per_rank = cfg.optim.batch_size // (rt.world * cfg.optim.accum_iter)
    if per_rank < 1 or per_rank * rt.world * cfg.optim.accum_iter != cfg.optim.batch_size:
        raise ConfigError(
            f"optim.batch_size {cfg.optim.batch_size} is not divisible by world {rt.world} x accum {cfg.optim.accum_iter}"
        )
    kind, _, arg = d.dataset.partition(":")
    loader_gen = torch.Generator().manual_seed(cfg.runtime.seed)  # keeps loaders off the global RNG
    common = dict(
        batch_size=per_rank,
        num_workers=d.num_workers,
        pin_memory=rt.device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
        generator=loader_gen,
    )
    if kind == "webdataset":
        if not d.epoch_size:
            raise ConfigError("webdataset needs data.epoch_size (samples per epoch)")
        shards = D.WebDatasetShards(arg, rank=rt.rank, world=rt.world, shuffle_buffer=d.shuffle_buffer, seed=cfg.runtime.seed)
        inner = D.PretrainDataset(
            [], D.PretrainTransform(tcfg), d.mask, mc.grid_size, num_mask, d.min_mask_patches_per_block, cfg.runtime.seed
        )
        ds = D.PretrainShards(shards, inner)
        loader = DataLoader(ds, **common)
        steps = d.epoch_size // cfg.optim.batch_size
    else:
        source = D.build_source(d.dataset, "train")
        if d.limit:
            source = torch.utils.data.Subset(source, range(min(d.limit, len(source))))
        ds = D.PretrainDataset(
            source, D.PretrainTransform(tcfg), d.mask, mc.grid_size, num_mask, d.min_mask_patches_per_block, cfg.runtime.seed
        )
        sampler = ResumableSampler(ds, rt.world, rt.rank, cfg.runtime.seed)
        loader = DataLoader(ds, sampler=sampler, **common)
        steps = len(sampler) // (per_rank * cfg.optim.accum_iter)
    if steps < 1:
        raise ConfigError(f"dataset too small for global batch {cfg.optim.batch_size}")
    return ds, loader, steps


# ---------------------------------------------------------------------------------------------- logging
class MetricsWriter:
    """JSONL (always) and TensorBoard (if installed) on the main process."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                _logger.info("tensorboard not installed; metrics go to %s only", self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint (they will be produced again)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _all_reduce_mean(value: float, rt: Runtime) -> float:
    if not rt.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / rt.world


# ---------------------------------------------------------------------------------------------- step
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
    out: Any, model: nn.Module, head: nn.Module, images2: torch.Tensor, cfg: PretrainConfig, autocast: Any
) -> dict[str, torch.Tensor]:
    """InfoNCE between the masked view's pooled feature (already encoded by the CAE step) and the pooled
    feature of the second, unmasked view."""
    from .instance import info_nce, pooled

    ic = cfg.instance
    with autocast:
        tokens2 = model.forward_encoder(images2)
        z1 = head(pooled(out.latent_visible, ic.pooling))
        z2 = head(pooled(tokens2, ic.pooling))
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
    clipped = list(model.parameters()) + (list(instance_head.parameters()) if instance_head is not None else [])
    accum = cfg.optim.accum_iter
    sums: dict[str, torch.Tensor] = {}
    count = 0
    t0 = time.perf_counter()
    seen = 0
    per_rank = cfg.optim.batch_size // (rt.world * accum)
    step = start_step
    micro = 0
    autocast = (
        torch.autocast(device_type=rt.device.type, dtype=rt.amp_dtype)
        if rt.amp_dtype is not None
        else contextlib.nullcontext()
    )
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
            with autocast:
                out = model(batch["images"], batch["mask"])
            losses = core.forward_loss(out, target)
            if instance_head is not None:
                extra = _instance_loss(out, core, instance_head, batch["images2"], cfg, autocast)
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
                **{k: _all_reduce_mean(float(v.detach()), rt) for k, v in losses.items()},
                "img_per_s": rate,
            }
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            if rt.is_main:
                terms = " ".join(f"{k} {rec[k]:.4f}" for k in losses)
                _logger.info(
                    "epoch %d/%d step %d/%d %s lr %.3e %.1f img/s eta %s",
                    epoch + 1, cfg.optim.epochs, step, steps_per_epoch, terms, lr, rate,
                    _fmt_eta(remaining * cfg.optim.batch_size / max(rate, 1e-9)),
                )  # fmt: skip
            if writer is not None:
                writer.write(rec)
        if on_step is not None:
            on_step(epoch, step)
        if cfg.runtime.max_steps is not None and epoch * steps_per_epoch + step >= cfg.runtime.max_steps:
            break
    _check_finite(sums, epoch, step)
    means = {k: _all_reduce_mean(float(v) / max(count, 1), rt) for k, v in sums.items()}
    means["steps"] = step
    return means


# ---------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # e.g. ENOSPC mid-write: drop the partial file (it would hold the space the next try needs); the
        # previous checkpoint and latest.json are untouched
        tmp.unlink(missing_ok=True)
        raise


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2))
            f.flush()
            os.fsync(f.fileno())  # so that a crash after the rename cannot leave an empty pointer
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    core: CAE = model.module if hasattr(model, "module") else model  # type: ignore[assignment]
    name = f"checkpoint-{epoch:04d}-{step_in_epoch:06d}.pth"
    path = out_dir / name
    obj = {
        "model": _model_state(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,  # the epoch in progress (complete when step_in_epoch == steps_per_epoch)
        "step_in_epoch": step_in_epoch,
        "global_step": epoch * steps_per_epoch + step_in_epoch,
        "rng": _rng_state(),
        "config": cfg.to_dict(),
        "model_config": core.cfg.to_dict(),
        "format": "cae-service-train",
    }
    if instance_head is not None:
        obj["instance_head"] = {k: v.detach().cpu() for k, v in instance_head.state_dict().items()}
    _atomic_torch_save(obj, path)
    _write_json_atomic(out_dir / CKPT_POINTER, {"checkpoint": name, "epoch": epoch, "step_in_epoch": step_in_epoch})
    _prune_checkpoints(out_dir, steps_per_epoch, keep_last)
    return path


def _prune_checkpoints(out_dir: Path, steps_per_epoch: int, keep_last: int) -> None:
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
    from .models.checkpoint import _safe_globals

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path}: cannot read training checkpoint ({type(e).__name__}: {str(e)[:200]})") from e


def find_resume_checkpoint(out_dir: Path) -> Path | None:
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


# ---------------------------------------------------------------------------------------------- driver
def build_model(cfg: PretrainConfig) -> CAE:
    model = create_model(cfg.model.name, **cfg.model.overrides)
    if cfg.model.init_from:
        from .models import load_model
        from .models.checkpoint import CheckpointError

        try:
            src = load_model(cfg.model.init_from)
        except (CheckpointError, OSError) as e:
            raise ConfigError(f"model.init_from: {e}") from e
        if src.cfg.to_dict() | {"extra": None} != model.cfg.to_dict() | {"extra": None}:
            diff = sorted(k for k, v in model.cfg.to_dict().items() if src.cfg.to_dict().get(k) != v and k != "extra")
            raise ConfigError(f"model.init_from {cfg.model.init_from}: architecture differs from the config in {diff}")
        model.load_state_dict(src.state_dict())
        _logger.info("initialized from %s", cfg.model.init_from)
    return model


def _wrap(model: CAE, cfg: PretrainConfig, rt: Runtime) -> nn.Module:
    wrapped: nn.Module = model
    if rt.distributed:
        if cfg.runtime.fsdp:
            from functools import partial

            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

            from .models.layers import Block, RegressorBlock

            policy = partial(transformer_auto_wrap_policy, transformer_layer_cls={Block, RegressorBlock})
            wrapped = FSDP(model, auto_wrap_policy=policy, device_id=rt.device if rt.device.type == "cuda" else None,
                           use_orig_params=True)  # fmt: skip
        else:
            ids = [rt.local_rank] if rt.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.runtime.compile:
        # Regional compilation: each transformer block is compiled once and reused; the masking
        # gathers around them stay eager (their sizes depend on the mask).
        import torch._dynamo

        from .models.layers import Block, RegressorBlock

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for mod in model.modules():
            if isinstance(mod, Block | RegressorBlock):
                mod.compile()
    return wrapped


def pretrain(cfg: PretrainConfig, output_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) a pretraining run. Returns the final epoch's metrics and output paths."""
    out_dir = Path(output_dir)
    rt = setup_runtime(cfg)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
    seed_everything(cfg.runtime.seed + rt.rank)
    model = build_model(cfg).to(rt.device)
    if cfg.runtime.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = None
    if model.cfg.target == "dalle":
        if not cfg.data.tokenizer_weights:
            raise ConfigError(
                "DALL-E targets need data.tokenizer_weights: convert OpenAI's encoder.pkl once with "
                "`python -m export convert-tokenizer encoder.pkl dalle_encoder.safetensors`"
            )
        from .tokenizers import DalleTokenizer

        tokenizer = DalleTokenizer.from_safetensors(cfg.data.tokenizer_weights, device=str(rt.device))
    ds, loader, steps_per_epoch = build_pretrain_data(cfg, model, rt)
    instance_head = None
    if cfg.instance.kind != "none":
        if rt.distributed:
            raise ConfigError("instance.kind=contrastive runs in one process only (its head is not wrapped in DDP)")
        from .instance import ProjectionHead

        instance_head = ProjectionHead(model.embed_dim, cfg.instance.hidden_dim, cfg.instance.proj_dim).to(rt.device)
    optimizer = build_optimizer(model, cfg, rt.device, extra=instance_head)
    scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
    writer = MetricsWriter(out_dir, rt.is_main, cfg.runtime.tensorboard)

    start_epoch, start_step = 0, 0
    if resume:
        ckpt_path = find_resume_checkpoint(out_dir)
        if ckpt_path is None:
            _logger.info("--resume: no checkpoint in %s, starting fresh", out_dir)
        else:
            ck = load_training_checkpoint(ckpt_path)
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            if instance_head is not None:
                if "instance_head" not in ck:
                    raise ConfigError(f"{ckpt_path}: no instance_head state, but instance.kind={cfg.instance.kind}")
                instance_head.load_state_dict(ck["instance_head"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            _set_rng_state(ck["rng"])
            start_epoch, start_step = ck["epoch"], ck["step_in_epoch"]
            if start_step >= steps_per_epoch:
                start_epoch, start_step = start_epoch + 1, 0
            writer.truncate_after(ck["global_step"])
            _logger.info("resumed from %s at epoch %d step %d", ckpt_path.name, start_epoch, start_step)

    wrapped = _wrap(model, cfg, rt)
    n_params = sum(p.numel() for p in model.parameters())
    if rt.is_main:
        _logger.info(
            "pretraining %s (%.2fM params) on %s: world %d, %d steps/epoch x %d epochs, global batch %d, precision %s",
            cfg.model.name, n_params / 1e6, rt.device, rt.world, steps_per_epoch, cfg.optim.epochs,
            cfg.optim.batch_size, rt.amp_dtype or "fp32",
        )  # fmt: skip

    def on_step(epoch: int, step: int) -> None:
        every = cfg.runtime.save_every_steps
        if every and step % every == 0 and step < steps_per_epoch and rt.is_main:
            save_checkpoint(out_dir, wrapped, optimizer, scaler, cfg, epoch, step, steps_per_epoch, cfg.runtime.keep_last,
                            instance_head)  # fmt: skip

    from .viz import plot_loss_curve, save_reconstruction_grid

    stats: dict[str, float] = {}
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.optim.epochs):
        ds.set_epoch(epoch)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            sampler.set_epoch(epoch)
            sampler.start = (start_step * loader.batch_size * cfg.optim.accum_iter) if epoch == start_epoch else 0
        # a fresh loader generator per epoch keeps worker seeds independent of history
        if hasattr(loader, "generator") and loader.generator is not None:
            loader.generator.manual_seed(cfg.runtime.seed * 100003 + epoch)
        t_epoch = time.perf_counter()
        stats = train_one_epoch(
            wrapped, loader, optimizer, epoch, cfg, rt, steps_per_epoch,
            start_step=start_step if epoch == start_epoch else 0,
            scaler=scaler, tokenizer=tokenizer, writer=writer, on_step=on_step, instance_head=instance_head,
        )  # fmt: skip
        done_steps = int(stats.pop("steps"))
        if rt.is_main:
            writer.write({"kind": "epoch", "epoch": epoch, "step": epoch * steps_per_epoch + done_steps,
                          "seconds": time.perf_counter() - t_epoch, **stats})  # fmt: skip
        stopped_early = done_steps < steps_per_epoch
        last = epoch == cfg.optim.epochs - 1
        if rt.is_main and (stopped_early or last or (epoch + 1) % cfg.runtime.save_every_epochs == 0):
            save_checkpoint(out_dir, wrapped, optimizer, scaler, cfg, epoch, done_steps, steps_per_epoch,
                            cfg.runtime.keep_last, instance_head)  # fmt: skip
        if rt.is_main:
            plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss_curve.png")
            if model.cfg.target == "pixel" and (last or (epoch + 1) % max(cfg.runtime.recon_every_epochs, 1) == 0):
                save_reconstruction_grid(model, ds, out_dir / f"recon-{epoch:04d}.png", rt.device, rt.amp_dtype)
        if stopped_early:
            break
    result: dict[str, Any] = {"epoch": epoch, **stats}
    if rt.is_main:
        final = out_dir / "model.safetensors"
        save_model(model, final, metadata={
            "run_config": json.dumps(cfg.to_dict()),
            "epoch": str(epoch),
            "preprocess": json.dumps(preprocess_spec(cfg, model)),
        })  # fmt: skip
        shutil.copyfile(out_dir / "config.yaml", out_dir / "model.config.yaml")
        result["model"] = str(final)
        _logger.info("wrote %s", final)
    writer.close()
    if rt.distributed:
        dist.barrier()
    return result
