"""Choosing and loading a backend.

``backend=auto`` walks a ranking of (runtime, precision) pairs, keeps those that are installed, can run
the bundle here, and meet the accuracy bound ``min_cosine`` (the minimum cosine of pooled embeddings to
the fp32 graph: the exporter's recorded parity where the bundle has it, else measured now against ONNX
Runtime fp32 on fixed inputs), then **times** the first few on this machine and keeps the fastest: which
runtime wins depends on the CPU (AMX vs AVX-512-BF16 vs neither) and on the model size, so it is measured,
not assumed. torch is never an automatic choice. An explicit backend or precision is taken as given (a
failure to load is an error).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bundle import Bundle
from .base import Backend, BackendOptions, BackendUnavailable
from .onnxruntime import OnnxRuntimeBackend
from .openvino import OpenVinoBackend
from .tensorrt import TensorRTBackend
from .torch_backend import TorchBackend

_logger = logging.getLogger("service")

BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": OnnxRuntimeBackend,
    "openvino": OpenVinoBackend,
    "tensorrt": TensorRTBackend,
    "torch": TorchBackend,
}
# Expected speed, fastest first (measured on ViT-S: OpenVINO bf16 ~4.6x ORT fp32 on an AMX/AVX-512-BF16
# CPU; on GPUs native TensorRT fp16 leads). The reference, ORT fp32, is last and always acceptable.
AUTO_RANKING: tuple[tuple[str, str], ...] = (
    ("tensorrt", "fp16"),
    ("tensorrt", "int8"),
    ("onnxruntime", "fp16"),  # CUDA EP / TensorRT EP (precisions() offers fp16 only with a GPU)
    ("tensorrt", "fp32"),
    ("openvino", "bf16"),
    ("onnxruntime", "int8"),
    ("openvino", "fp32"),
    ("onnxruntime", "fp32"),
)


@dataclass
class Selection:
    backend: Backend
    reason: str
    measured_cosine: float | None = None
    skipped: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # candidate -> images/s measured at start-up

    def describe(self) -> dict[str, Any]:
        return {"reason": self.reason, "measured_cosine": self.measured_cosine, "skipped": self.skipped,
                "images_per_s": self.timings}  # fmt: skip


def measure_throughput(backend: Backend, bundle: Bundle, batch: int = 8, seconds: float = 0.5) -> float:
    """Images/s of the embed task on probe inputs (after one warm-up call)."""
    if "embed" not in bundle.tasks:
        return 0.0
    x = np.concatenate([_probe_inputs(bundle)] * ((batch + 3) // 4))[:batch]
    backend.infer("embed", {"images": x})
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        backend.infer("embed", {"images": x})
        n += batch
    return n / (time.perf_counter() - t0)


def _probe_inputs(bundle: Bundle, n: int = 4) -> np.ndarray:
    """Fixed, image-like inputs (smooth gradients + noise, normalized range) for accuracy checks."""
    rng = np.random.default_rng(0)
    c, s = bundle.image.channels, bundle.image.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    base = np.stack([np.sin(3 * xx + k) + np.cos(2 * yy - k) for k in range(n * c)]).reshape(n, c, s, s)
    return (base + 0.3 * rng.standard_normal((n, c, s, s))).astype(np.float32)


def measure_cosine(backend: Backend, bundle: Bundle) -> float:
    """Min cosine of the cls embedding of ``backend`` to ONNX Runtime fp32 on CPU."""
    ref = OnnxRuntimeBackend(BackendOptions(device="cpu"))
    ref.load(bundle, "fp32")
    x = _probe_inputs(bundle)
    a = ref.infer("embed", {"images": x})[:, 0].astype(np.float64)
    b = backend.infer("embed", {"images": x})[:, 0].astype(np.float64)
    ref.close()
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return float(cos.min())


def _try(
    name: str, precision: str, bundle: Bundle, options: BackendOptions, min_cosine: float | None
) -> tuple[Backend, float | None]:
    """Load ``name`` at ``precision``; with ``min_cosine`` (automatic choices) the precision must also be
    one this backend offers here and meet the accuracy bound."""
    cls = BACKENDS[name]
    reason = cls.probe()
    if reason:
        raise BackendUnavailable(reason)
    backend = cls(options)
    if min_cosine is not None:
        if precision not in backend.precisions(bundle):
            raise BackendUnavailable(f"{precision} not offered here for this bundle")
        recorded = backend.recorded_cosine(bundle, precision)
        if recorded is not None and recorded < min_cosine:
            raise BackendUnavailable(f"recorded cosine {recorded:.6f} < min_cosine {min_cosine}")
    backend.load(bundle, precision)
    measured = None
    if (
        min_cosine is not None
        and backend.recorded_cosine(bundle, precision) is None
        and "embed" in bundle.tasks
    ):
        if OnnxRuntimeBackend.probe() is not None:
            backend.close()
            raise BackendUnavailable("accuracy unknown and no onnxruntime reference to measure it")
        measured = measure_cosine(backend, bundle)
        if measured < min_cosine:
            backend.close()
            raise BackendUnavailable(f"measured cosine {measured:.6f} < min_cosine {min_cosine}")
    return backend, measured


def select_backend(
    bundle: Bundle,
    backend: str = "auto",
    precision: str = "auto",
    options: BackendOptions | None = None,
    min_cosine: float = 0.999,
    max_timed: int = 3,
) -> Selection:
    """Load the backend the settings ask for (see the module docstring); raise BackendUnavailable if none."""
    options = options or BackendOptions()
    if backend != "auto" and backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; known: {sorted(BACKENDS)}")
    if backend != "auto" and precision != "auto":
        loaded, _ = _try(backend, precision, bundle, options, None)
        return Selection(loaded, f"{backend} {precision} as configured")
    if backend != "auto":
        reason = BACKENDS[backend].probe()
        if reason:
            raise BackendUnavailable(f"backend {backend}: {reason}")
        candidates = [(backend, p) for p in BACKENDS[backend](options).precisions(bundle)]
        what = f"fastest {backend} precision meeting min_cosine {min_cosine}"
    else:
        candidates = [c for c in AUTO_RANKING if precision in ("auto", c[1])]
        what = f"fastest available backend meeting min_cosine {min_cosine}"
        if precision != "auto":
            what = f"fastest available backend for {precision} as configured"
    # an explicitly configured precision is taken as given: no accuracy gate
    gate = min_cosine if precision == "auto" else None
    skipped: list[str] = []
    viable: list[tuple[Backend, float | None, str]] = []
    # a candidate that cannot run every task of the bundle (e.g. no TensorRT engine for an optional
    # dense head) is kept only as a fallback: auto prefers serving every route the bundle has
    partial: tuple[Backend, float | None, str] | None = None
    for name, prec in candidates:
        if len(viable) >= max_timed:
            break
        try:
            loaded, measured = _try(name, prec, bundle, options, gate)
        except BackendUnavailable as e:
            skipped.append(f"{name} {prec}: {e}")
            _logger.debug("backend candidate %s %s skipped: %s", name, prec, e)
            continue
        if loaded.unavailable:
            skipped.append(f"{name} {prec}: cannot run {', '.join(sorted(loaded.unavailable))}")
            if partial is None:
                partial = (loaded, measured, f"{name} {prec}")
            else:
                loaded.close()
            continue
        viable.append((loaded, measured, f"{name} {prec}"))
    if not viable and partial is not None:
        viable.append(partial)
    elif partial is not None:
        partial[0].close()
    if len(viable) == 1 or (viable and max_timed <= 1):
        return Selection(viable[0][0], what, viable[0][1], skipped)
    if viable:
        timings = {label: measure_throughput(b, bundle) for b, _, label in viable}
        best = max(range(len(viable)), key=lambda i: timings[viable[i][2]])
        for i, (b, _, _) in enumerate(viable):
            if i != best:
                b.close()
        _logger.info("backend timings (images/s, embed batch 8): %s", {k: round(v, 1) for k, v in timings.items()})
        loaded, measured, _ = viable[best]
        return Selection(loaded, what + ", timed here", measured, skipped, timings)
    raise BackendUnavailable(
        "no backend can serve this bundle here: " + ("; ".join(skipped) or "no candidates")
    )
