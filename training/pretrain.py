"""The pretraining driver: set-up, resume, checkpoints, PNGs and the final ``model.safetensors``.

Each epoch is :func:`training.engine.train_one_epoch`; checkpoints are written at epoch ends and every
``runtime.save_every_steps``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from . import data as D
from .checkpointing import find_resume_checkpoint, load_training_checkpoint, save_checkpoint, set_rng_state
from .config import ConfigError, PretrainConfig
from .engine import build_model, build_optimizer, compile_blocks, train_one_epoch
from .models import CAE, save_model
from .preprocess import Preprocessing
from .runtime import Runtime, seed_everything, setup_runtime
from .tracking import MetricsWriter

__all__ = ["ResumableSampler", "build_pretrain_data", "preprocess_spec", "pretrain", "wrap_model"]

_logger = logging.getLogger("training")


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (skipping what a checkpoint already consumed).

    The epoch's permutation is ``torch.randperm(n, seed + epoch)`` and rank r takes every world-th index:
    a step's global batch is the same set of samples for any number of processes.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def preprocess_spec(cfg: PretrainConfig, model: CAE) -> Preprocessing:
    """How images must be prepared for this encoder (saved in the model file, read by eval and export)."""
    d = cfg.data
    return Preprocessing.for_dataset(
        d.dataset, model.cfg.img_size, d.mean, d.std, source="metadata.preprocess"
    )


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
            f"optim.batch_size {cfg.optim.batch_size} is not divisible by "
            f"world {rt.world} x accum {cfg.optim.accum_iter}"
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
        shards = D.WebDatasetShards(
            arg, rank=rt.rank, world=rt.world, shuffle_buffer=d.shuffle_buffer, seed=cfg.runtime.seed
        )
        inner = D.PretrainDataset(
            [],
            D.PretrainTransform(tcfg),
            d.mask,
            mc.grid_size,
            num_mask,
            d.min_mask_patches_per_block,
            cfg.runtime.seed,
        )
        ds = D.PretrainShards(shards, inner)
        loader = DataLoader(ds, **common)
        steps = d.epoch_size // cfg.optim.batch_size
    else:
        source = D.build_source(d.dataset, "train")
        if d.limit:
            source = torch.utils.data.Subset(source, range(min(d.limit, len(source))))
        ds = D.PretrainDataset(
            source,
            D.PretrainTransform(tcfg),
            d.mask,
            mc.grid_size,
            num_mask,
            d.min_mask_patches_per_block,
            cfg.runtime.seed,
        )
        sampler = ResumableSampler(ds, rt.world, rt.rank, cfg.runtime.seed)
        loader = DataLoader(ds, sampler=sampler, **common)
        steps = len(sampler) // (per_rank * cfg.optim.accum_iter)
    if steps < 1:
        raise ConfigError(f"dataset too small for global batch {cfg.optim.batch_size}")
    return ds, loader, steps


def wrap_model(model: CAE, cfg: PretrainConfig, rt: Runtime) -> nn.Module:
    """DDP or FSDP across processes, and regional compilation of the blocks, as configured."""
    wrapped: nn.Module = model
    if rt.distributed:
        if cfg.runtime.fsdp:
            from functools import partial

            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

            from .models.layers import Block, RegressorBlock

            policy = partial(transformer_auto_wrap_policy, transformer_layer_cls={Block, RegressorBlock})
            wrapped = FSDP(
                model,
                auto_wrap_policy=policy,
                device_id=rt.device if rt.device.type == "cuda" else None,
                use_orig_params=True,
            )
        else:
            ids = [rt.local_rank] if rt.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.runtime.compile:
        compile_blocks(model)
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
            raise ConfigError(
                f"instance.kind={cfg.instance.kind} runs in one process only (its head is not wrapped in DDP)"
            )
        from .instance import build_instance_head

        ic = cfg.instance
        try:
            queue = ic.queue_size if ic.kind == "nn_contrastive" else 0
            instance_head = build_instance_head(
                model, ic.pooling, ic.hidden_dim, ic.proj_dim, queue_size=queue
            ).to(rt.device)
        except ValueError as e:
            raise ConfigError(f"instance.pooling: {e}") from e
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
                    raise ConfigError(
                        f"{ckpt_path}: no instance_head state, but instance.kind={cfg.instance.kind}"
                    )
                instance_head.load_state_dict(ck["instance_head"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            set_rng_state(ck["rng"])
            start_epoch, start_step = ck["epoch"], ck["step_in_epoch"]
            if start_step >= steps_per_epoch:
                start_epoch, start_step = start_epoch + 1, 0
            writer.truncate_after(ck["global_step"])
            _logger.info("resumed from %s at epoch %d step %d", ckpt_path.name, start_epoch, start_step)

    wrapped = wrap_model(model, cfg, rt)
    n_params = sum(p.numel() for p in model.parameters())
    if rt.is_main:
        _logger.info(
            "pretraining %s (%.2fM params) on %s: world %d, %d steps/epoch x %d epochs, "
            "global batch %d, precision %s",
            cfg.model.name,
            n_params / 1e6,
            rt.device,
            rt.world,
            steps_per_epoch,
            cfg.optim.epochs,
            cfg.optim.batch_size,
            rt.amp_dtype or "fp32",
        )

    def checkpoint(epoch: int, step: int) -> None:
        save_checkpoint(
            out_dir,
            wrapped,
            optimizer,
            scaler,
            cfg,
            epoch,
            step,
            steps_per_epoch,
            cfg.runtime.keep_last,
            instance_head,
        )

    def on_step(epoch: int, step: int) -> None:
        every = cfg.runtime.save_every_steps
        if every and step % every == 0 and step < steps_per_epoch and rt.is_main:
            checkpoint(epoch, step)

    from .viz import plot_loss_curve, save_reconstruction_grid

    stats: dict[str, float] = {}
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.optim.epochs):
        ds.set_epoch(epoch)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            sampler.set_epoch(epoch)
            sampler.start = (
                (start_step * loader.batch_size * cfg.optim.accum_iter) if epoch == start_epoch else 0
            )
        # a fresh loader generator per epoch keeps worker seeds independent of history
        if hasattr(loader, "generator") and loader.generator is not None:
            loader.generator.manual_seed(cfg.runtime.seed * 100003 + epoch)
        t_epoch = time.perf_counter()
        stats = train_one_epoch(
            wrapped,
            loader,
            optimizer,
            epoch,
            cfg,
            rt,
            steps_per_epoch,
            start_step=start_step if epoch == start_epoch else 0,
            scaler=scaler,
            tokenizer=tokenizer,
            writer=writer,
            on_step=on_step,
            instance_head=instance_head,
        )
        done_steps = int(stats.pop("steps"))
        if rt.is_main:
            writer.write(
                {
                    "kind": "epoch",
                    "epoch": epoch,
                    "step": epoch * steps_per_epoch + done_steps,
                    "seconds": time.perf_counter() - t_epoch,
                    **stats,
                }
            )
        stopped_early = done_steps < steps_per_epoch
        last = epoch == cfg.optim.epochs - 1
        if rt.is_main and (stopped_early or last or (epoch + 1) % cfg.runtime.save_every_epochs == 0):
            checkpoint(epoch, done_steps)
        if rt.is_main:
            plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss_curve.png")
            if model.cfg.target == "pixel" and (
                last or (epoch + 1) % max(cfg.runtime.recon_every_epochs, 1) == 0
            ):
                save_reconstruction_grid(
                    model, ds, out_dir / f"recon-{epoch:04d}.png", rt.device, rt.amp_dtype
                )
        if stopped_early:
            break
    result: dict[str, Any] = {"epoch": epoch, **stats}
    if rt.is_main:
        final = out_dir / "model.safetensors"
        save_model(
            model,
            final,
            metadata={
                "run_config": json.dumps(cfg.to_dict()),
                "epoch": str(epoch),
                "preprocess": preprocess_spec(cfg, model).to_metadata(),
            },
        )
        shutil.copyfile(out_dir / "config.yaml", out_dir / "model.config.yaml")
        result["model"] = str(final)
        _logger.info("wrote %s", final)
    writer.close()
    if rt.distributed:
        dist.barrier()
    return result
