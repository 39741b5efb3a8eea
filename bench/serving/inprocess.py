"""The same graph in this process (no HTTP), and the ViT-S/16 bundle builder."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    _ms,
)


# ------------------------------------------------------------------------------------- in-process
def _time_calls(fn: Callable[[], Any], seconds: float, min_calls: int = 5) -> list[float]:
    """Durations of back-to-back calls of ``fn`` for ``seconds`` (at least ``min_calls``)."""
    durations: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(durations) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - t0)
    return durations


def measure_inprocess(
    bundle_dir: Path,
    backend: str,
    precision: str,
    device: str,
    max_batch: int,
    png: bytes,
    seconds: float,
    warmup: float,
) -> dict[str, Any]:
    """The bundle's embed graph in this process on the server's backend and precision, no HTTP."""
    from service.backends import BackendOptions, select_backend
    from service.bundle import load_bundle
    from service.imaging import Limits, Preprocessor

    bundle = load_bundle(bundle_dir)
    options = BackendOptions(device=device, max_batch_size=max_batch)
    be = select_backend(bundle, options=options, pinned={"embed": (backend, precision)}).backend
    try:
        pre = Preprocessor(bundle.image, Limits(max_pixels=1 << 31, min_side=1))
        x1 = pre(png)[None]
        xb = np.repeat(x1, max_batch, axis=0)

        def batched() -> None:
            be.infer("embed", {"images": xb})

        def single() -> None:
            be.infer("embed", {"images": x1})

        _time_calls(batched, warmup, 2)
        _time_calls(single, min(warmup, 1.0), 2)
        t_batched = _time_calls(batched, seconds)
        t_single = _time_calls(single, seconds)
        t_pre = _time_calls(lambda: pre(png), min(seconds, 2.0))
    finally:
        be.close()
    return {
        "backend": be.name,
        "precision": be.precision,
        "device": be.device,
        "max_batch": max_batch,
        "batched_img_per_s": max_batch * len(t_batched) / sum(t_batched),
        "batched_call_p50_ms": _ms(t_batched, 50),
        "batch1_img_per_s": len(t_single) / sum(t_single),
        "batch1_p50_ms": _ms(t_single, 50),
        "batch1_p99_ms": _ms(t_single, 99),
        "preprocess_p50_ms": _ms(t_pre, 50),
        "calls": {"batched": len(t_batched), "batch1": len(t_single), "preprocess": len(t_pre)},
    }


# ------------------------------------------------------------------------------------- ViT-S bundle
def make_vits(out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """A random-init (seeded) CAE ViT-S/16 at 224 (6 heads), exported with the embed graph only."""
    import torch

    from export.onnx_export import export_bundle
    from training.models import create_model, save_model

    torch.manual_seed(seed)
    model = create_model("cae_small_patch16_224", num_heads=6, target="pixel").eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_model(model, Path(tmp) / f"cae-vits16-224-random-seed{seed}.safetensors")
        return export_bundle(ckpt, out_dir, tasks=("embed",))


def fastest_inprocess(
    bundle_dir: Path, device: str, max_batch: int, png: bytes, seconds: float
) -> dict[str, float]:
    """Images/s at ``max_batch`` of every runtime and precision that can run the embed graph here
    (ONNX Runtime fp32/int8, OpenVINO fp32/bf16, ...): the fastest is the issue's reference rate."""
    from service.backends import BackendOptions, BackendUnavailable, select_backend
    from service.backends.select import AUTO_RANKING
    from service.bundle import load_bundle
    from service.imaging import Limits, Preprocessor

    bundle = load_bundle(bundle_dir)
    xb = np.repeat(
        Preprocessor(bundle.image, Limits(max_pixels=1 << 31, min_side=1))(png)[None], max_batch, 0
    )
    rates: dict[str, float] = {}
    for name, precision in AUTO_RANKING:
        try:
            be = select_backend(
                bundle, options=BackendOptions(device=device, max_batch_size=max_batch),
                pinned={"embed": (name, precision)},
            ).backend  # fmt: skip
        except BackendUnavailable:
            continue
        try:
            if "embed" not in be.capabilities or be.task_precision.get("embed") != precision:
                continue

            def call(be: Any = be) -> None:
                be.infer("embed", {"images": xb})

            _time_calls(call, min(1.0, seconds / 2), 2)
            t = _time_calls(call, seconds)
            rates[f"{name} {precision}"] = max_batch * len(t) / sum(t)
        finally:
            be.close()
    return rates
