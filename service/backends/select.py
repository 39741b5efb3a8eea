"""Choosing and loading the runtime of each task.

``backend=auto`` chooses **per task** (``embed``, ``reconstruct``, ``segment``, ``detect`` are separate
graphs): for each task it walks a ranking of (runtime, precision) pairs and keeps those that are
installed, can compile *that task's* graph here, and meet the accuracy bound ``min_cosine`` on *what that
task returns* (the exporter's recorded parity of that task's variant where the bundle has one, else
measured now against ONNX Runtime fp32 on fixed inputs: pooled and per-token embeddings for ``embed``,
predicted patches for ``reconstruct``, logits for ``segment``, every output for ``detect``). It then
**times** the first few on this machine with the task's own inputs and keeps the fastest: which runtime
wins depends on the CPU (AMX vs AVX-512-BF16 vs neither), on the model size and on the graph, so it is
measured, not assumed. A graph one runtime cannot compile removes that runtime for that task only. torch
is never an automatic choice. An explicit backend *and* precision is taken as given: one runtime loads
every task it can (a task it cannot compile is reported unavailable, 501), with no accuracy gate.

Every reason kept in ``Selection`` is one line that names the problem (no exception dumps, no source
paths): it is shown in ``GET /v1/models`` and logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..bundle_format import min_row_cosine
from .base import Backend, BackendOptions, BackendUnavailable, clean_reason
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
# Expected speed, fastest first (OpenVINO bf16 ~4.6x ORT fp32 on ViT-S on an AMX CPU; on GPUs native
# TensorRT fp16 leads). Only the order in which candidates are tried and timed: the fastest of the first
# ``max_timed`` viable ones is kept. The reference, ORT fp32, is last and always acceptable.
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
TIMING_ROWS = {"embed": 8, "reconstruct": 8}  # rows per timed call; other tasks: 2 (or their fixed batch)
TIMING_ROUNDS = 2


@dataclass
class TaskChoice:
    """What serves one task, and why."""

    task: str
    backend: Backend
    label: str  # "openvino bf16"
    cosine: float | None = None  # to the fp32 graph on this task's outputs
    cosine_source: str | None = None  # "recorded" (the exporter's parity), "measured" (at start-up), "exact"
    timings: dict[str, float] = field(default_factory=dict)  # candidate -> rows/s measured at start-up
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "precision": self.backend.task_precision.get(self.task, self.backend.precision),
            "cosine": self.cosine,
            "cosine_source": self.cosine_source,
            "images_per_s": {k: round(v, 1) for k, v in self.timings.items()},
            "skipped": list(self.skipped),
        }


@dataclass
class Selection:
    backend: Backend
    reason: str
    measured_cosine: float | None = None  # embed's, when measured at start-up
    skipped: list[str] = field(default_factory=list)  # "task: runtime precision: why", one line each
    timings: dict[str, float] = field(default_factory=dict)  # embed: candidate -> images/s at start-up
    tasks: dict[str, TaskChoice] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "measured_cosine": self.measured_cosine,
            "skipped": self.skipped,
            "images_per_s": {k: round(v, 1) for k, v in self.timings.items()},
            "tasks": {t: c.describe() for t, c in self.tasks.items()},
        }


class PerTaskBackend(Backend):
    """Routes each task to the backend chosen for it (``select_backend`` with ``auto``). ``name`` and
    ``precision`` are the distinct runtimes / precisions in task order joined by ``+``
    (``openvino+onnxruntime``); ``task_backend`` / ``task_precision`` say which serves what."""

    name = "per-task"

    def __init__(self, parts: dict[str, Backend], unavailable: dict[str, str]) -> None:
        super().__init__()
        self._parts = parts

        def distinct(xs: list[str]) -> str:
            return "+".join(dict.fromkeys(xs)) or "none"

        self.name = distinct([b.name for b in parts.values()])  # type: ignore[misc]
        self.task_backend = {t: b.name for t, b in parts.items()}
        self.task_precision = {t: b.task_precision.get(t, b.precision) for t, b in parts.items()}
        self.precision = distinct(list(self.task_precision.values()))
        self.device = distinct([b.device for b in parts.values()])
        self.capabilities = frozenset(parts)
        self.unavailable = dict(unavailable)
        caps = [b.max_batch_size for b in parts.values() if b.max_batch_size]
        self.max_batch_size = min(caps) if caps else None

    def part(self, task: str) -> Backend:
        return self._parts[task]

    def load(self, bundle: Bundle, precision: str = "fp32", tasks: Any = None) -> None:
        """The parts are loaded by the selector."""

    def infer(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._parts[task].infer(task, inputs)

    def infer_outputs(self, task: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._parts[task].infer_outputs(task, inputs)

    def close(self) -> None:
        for b in {id(b): b for b in self._parts.values()}.values():
            b.close()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["task_backend"] = dict(self.task_backend)
        providers = {}
        for t, b in self._parts.items():
            p = b.describe().get("providers")
            if isinstance(p, dict) and t in p:
                providers[t] = p[t]
        if providers:
            d["providers"] = providers
        return d


# ------------------------------------------------------------------------------------------ probes
def _image_like(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Smooth gradients + noise in the normalized range: inputs that look like images to a model."""
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    base = np.stack([np.sin(3 * xx + k) + np.cos(2 * yy - k) for k in range(n * c)]).reshape(n, c, h, w)
    return (base + 0.3 * rng.standard_normal((n, c, h, w))).astype(np.float32)


def probe_inputs(bundle: Bundle, task: str = "embed", rows: int = 4) -> dict[str, np.ndarray]:
    """Fixed inputs for one call of ``task``, from the spec's tensor list: image-like float tensors, and
    bool masks at the default mask ratio (the same count in every row, as the graph needs)."""
    rows = bundle.fixed_batch(task) or rows
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(bundle.spec["tasks"][task]["inputs"]):
        shape = (rows, *(int(d) for d in t["shape"][1:]))
        if t["dtype"] == "bool":
            n = shape[-1]
            k = min(n - 1, max(1, int(round(bundle.default_mask_ratio * n))))
            rng = np.random.default_rng(i)
            x = np.zeros(shape, dtype=bool)
            for r in range(rows):
                x[r, rng.choice(n, k, replace=False)] = True
            out[t["name"]] = x
        elif len(shape) == 4:
            out[t["name"]] = _image_like(shape, seed=i)
        else:
            out[t["name"]] = np.random.default_rng(i).standard_normal(shape).astype(t["dtype"])
    return out


def _run(backend: Backend, bundle: Bundle, task: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of one call, by the spec's output names (in the spec's order)."""
    names = [o["name"] for o in bundle.spec["tasks"][task]["outputs"]]
    if len(names) == 1:
        return {names[0]: backend.infer(task, inputs)}
    outs = backend.infer_outputs(task, inputs)
    if not set(names) <= set(outs) and len(outs) == len(names):  # a runtime that renamed them
        outs = dict(zip(names, outs.values(), strict=True))
    return {n: outs[n] for n in names if n in outs}


def output_cosine(task: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """How close ``got`` is to the fp32 reference on what ``task`` returns: the min cosine over its
    outputs (per row; embed's tokens as each pooling /embed serves: cls, mean of patch tokens, every
    token); 0.0 when shapes differ (e.g. another number of detections) or integer outputs disagree."""
    worst = 1.0
    for i, (name, a) in enumerate(ref.items()):
        b = got.get(name)
        if b is None or a.shape != b.shape:
            return 0.0
        if a.dtype.kind in "iub":  # labels: must agree exactly
            if not np.array_equal(a, b):
                return 0.0
            continue
        if not a.size:
            continue
        if task == "embed" and i == 0 and a.ndim == 3:
            worst = min(
                worst, min_row_cosine(a[:, 0], b[:, 0]), min_row_cosine(a[:, 1:].mean(1), b[:, 1:].mean(1))
            )
            a, b = a[:, 1:], b[:, 1:]
        if task == "detect" or a.ndim == 1:  # detect runs one image per call: its outputs are one row
            a, b = a[None], b[None]
        worst = min(worst, min_row_cosine(a, b))
    return worst


def measure_cosine(backend: Backend, bundle: Bundle, task: str = "embed") -> float:
    """Min cosine of ``task``'s outputs from ``backend`` to ONNX Runtime fp32 on CPU (fixed inputs)."""
    ref = OnnxRuntimeBackend(BackendOptions(device="cpu"))
    ref.load(bundle, "fp32", tasks=[task])
    try:
        x = probe_inputs(bundle, task)
        return output_cosine(task, _run(ref, bundle, task, x), _run(backend, bundle, task, x))
    finally:
        ref.close()


def measure_throughput(
    backend: Backend, bundle: Bundle, task: str = "embed", seconds: float = 0.1, rows: int | None = None
) -> float:
    """Rows (images) per second of ``task`` on probe inputs, after one warm-up call."""
    if task not in bundle.tasks:
        return 0.0
    rows = bundle.fixed_batch(task) or rows or TIMING_ROWS.get(task, 2)
    x = probe_inputs(bundle, task, rows)
    _run(backend, bundle, task, x)
    n, t0 = 0, time.perf_counter()
    while n < 2 * rows or time.perf_counter() - t0 < seconds:
        _run(backend, bundle, task, x)
        n += rows
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------- selection
def _explicit(name: str, precision: str, bundle: Bundle, options: BackendOptions) -> Backend:
    """``name`` at ``precision`` for every task it can run (no accuracy gate: taken as given)."""
    cls = BACKENDS[name]
    reason = cls.probe()
    if reason:
        raise BackendUnavailable(f"backend {name}: {reason}")
    backend = cls(options)
    backend.load(bundle, precision)
    return backend


class _Candidates:
    """Loads (runtime, precision) for one task at a time, remembering runtimes that cannot run here."""

    def __init__(self, bundle: Bundle, options: BackendOptions, min_cosine: float | None) -> None:
        self.bundle, self.options, self.min_cosine = bundle, options, min_cosine
        self.absent: dict[str, str] = {}  # runtime -> why it cannot run here at all (logged once)

    def try_load(self, name: str, precision: str, task: str) -> tuple[Backend, float | None, str | None]:
        """A backend with ``task`` loaded, its cosine and where that came from; BackendUnavailable (one
        line) when it is not installed, lacks the graph, cannot compile it, or misses the bound."""
        cls = BACKENDS[name]
        if name not in self.absent:
            reason = cls.probe()
            if reason:
                self.absent[name] = reason
        if name in self.absent:
            raise BackendUnavailable(self.absent[name])
        backend = cls(self.options)
        gate = self.min_cosine
        if gate is not None:
            if precision not in backend.precisions(self.bundle, task):
                raise BackendUnavailable(f"{precision} not offered for {task} here")
            recorded = backend.recorded_cosine(self.bundle, precision, task)
            if recorded is not None and recorded < gate:
                raise BackendUnavailable(f"recorded cosine {recorded:.6f} < min_cosine {gate:g}")
        try:
            backend.load(self.bundle, precision, tasks=[task])
        except BackendUnavailable as e:
            raise BackendUnavailable(clean_reason(e)) from None
        if task not in backend.capabilities:
            backend.close()
            raise BackendUnavailable(backend.unavailable.get(task, f"cannot run {task}"))
        if gate is None:
            return backend, None, None
        recorded = backend.recorded_cosine(self.bundle, precision, task)
        if recorded is not None:
            return backend, recorded, "exact" if precision == "fp32" and recorded == 1.0 else "recorded"
        if OnnxRuntimeBackend.probe() is not None:
            backend.close()
            raise BackendUnavailable("accuracy unknown and no onnxruntime reference to measure it")
        try:
            measured = measure_cosine(backend, self.bundle, task)
        except Exception as e:  # the candidate cannot run its own graph: not viable
            backend.close()
            raise BackendUnavailable(f"failed on probe inputs: {clean_reason(e)}") from None
        if measured < gate:
            backend.close()
            raise BackendUnavailable(f"measured cosine {measured:.6f} < min_cosine {gate:g}")
        return backend, measured, "measured"


def _choose_task(
    task: str,
    candidates: list[tuple[str, str]],
    loader: _Candidates,
    max_timed: int,
    timer: Callable[[Backend, Bundle, str], float],
) -> tuple[TaskChoice | None, list[str]]:
    """The fastest viable candidate for ``task`` (None if there is none) and the skipped ones."""
    skipped: list[str] = []
    viable: list[TaskChoice] = []
    for name, prec in candidates:
        if len(viable) >= max_timed:
            break
        label = f"{name} {prec}"
        if name in loader.absent:
            continue  # said once, for every task, by select_backend
        try:
            backend, cos, source = loader.try_load(name, prec, task)
        except BackendUnavailable as e:
            if name not in loader.absent:
                skipped.append(f"{label}: {e}")
            _logger.debug("%s: candidate %s skipped: %s", task, label, e)
            continue
        viable.append(TaskChoice(task, backend, label, cos, source))
    if not viable:
        return None, skipped
    best = viable[0]
    if len(viable) > 1:
        # interleaved rounds, best round kept: a runtime's worker threads still spinning after its turn
        # (OpenVINO's) must not slow the next candidate's measurement
        timings = dict.fromkeys((c.label for c in viable), 0.0)
        for _ in range(TIMING_ROUNDS):
            for c in viable:
                timings[c.label] = max(timings[c.label], timer(c.backend, loader.bundle, task))
        best = max(viable, key=lambda c: timings[c.label])
        best.timings = timings
    for c in viable:
        if c is not best:
            c.backend.close()
    best.skipped = skipped
    return best, skipped


def parse_task_backends(text: str | None) -> dict[str, tuple[str, str]]:
    """``"embed=openvino:bf16,detect=onnxruntime:fp32"`` -> {task: (backend, precision)}."""
    out: dict[str, tuple[str, str]] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        task, sep, choice = item.partition("=")
        name, sep2, precision = choice.partition(":")
        if not (sep and sep2 and task.strip() and name.strip() and precision.strip()):
            raise ValueError(f"task_backends: {item!r} is not task=backend:precision")
        out[task.strip()] = (name.strip(), precision.strip())
    return out


def format_task_backends(backend: Backend) -> str:
    """The inverse of ``parse_task_backends`` for a loaded (per-task) backend."""
    names = getattr(backend, "task_backend", None) or dict.fromkeys(backend.capabilities, backend.name)
    return ",".join(
        f"{t}={names[t]}:{backend.task_precision.get(t, backend.precision)}"
        for t in sorted(backend.capabilities)
    )


def _pinned(bundle: Bundle, pinned: dict[str, tuple[str, str]], options: BackendOptions) -> Selection:
    loader = _Candidates(bundle, options, None)
    choices: dict[str, TaskChoice] = {}
    unavailable: dict[str, str] = {}
    for task in bundle.tasks:
        if task not in pinned:
            unavailable[task] = "not in task_backends"
            continue
        name, precision = pinned[task]
        if name not in BACKENDS:
            raise BackendUnavailable(f"task_backends: unknown backend {name!r} for {task}")
        try:
            backend, _, _ = loader.try_load(name, precision, task)
        except BackendUnavailable as e:
            unavailable[task] = f"{name} {precision}: {e}"
            continue
        choices[task] = TaskChoice(task, backend, f"{name} {precision}")
    if not choices:
        raise BackendUnavailable("task_backends: no task could be loaded: " + "; ".join(unavailable.values()))
    composite = PerTaskBackend({t: c.backend for t, c in choices.items()}, unavailable)
    return Selection(composite, "per task as pinned by task_backends", None, [], {}, choices)


def select_backend(
    bundle: Bundle,
    backend: str = "auto",
    precision: str = "auto",
    options: BackendOptions | None = None,
    min_cosine: float = 0.999,
    max_timed: int = 3,
    timer: Callable[[Backend, Bundle, str], float] | None = None,
    pinned: dict[str, tuple[str, str]] | None = None,
) -> Selection:
    """Load what the settings ask for (see the module docstring); raise BackendUnavailable if no task of
    the bundle can be served. ``timer(backend, bundle, task) -> rows/s`` replaces the start-up timing
    (tests). ``pinned`` {task: (backend, precision)} loads those as given (``task_backends``: how the
    processes of ``workers > 1`` all serve what their parent selected, without timing again)."""
    options = options or BackendOptions()
    if pinned:
        return _pinned(bundle, pinned, options)
    timer = timer or measure_throughput
    if backend != "auto" and backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
    if backend != "auto" and precision != "auto":
        loaded = _explicit(backend, precision, bundle, options)
        refused = [f"{t}: {backend} {precision}: {why}" for t, why in loaded.unavailable.items()]
        return Selection(loaded, f"{backend} {precision} as configured", None, refused)
    if backend != "auto":
        reason = BACKENDS[backend].probe()
        if reason:
            raise BackendUnavailable(f"backend {backend}: {reason}")
        probe = BACKENDS[backend](options)

        def candidates_for(task: str) -> list[tuple[str, str]]:
            return [(backend, p) for p in probe.precisions(bundle, task)]

        what = f"per task, the fastest {backend} precision meeting min_cosine {min_cosine:g} on its outputs"
    else:

        def candidates_for(task: str) -> list[tuple[str, str]]:
            return [c for c in AUTO_RANKING if precision in ("auto", c[1])]

        what = f"per task, the fastest available backend meeting min_cosine {min_cosine:g} on its outputs"
        if precision != "auto":
            what = f"per task, the fastest available backend for {precision} as configured"
    # an explicitly configured precision is taken as given: no accuracy gate
    loader = _Candidates(bundle, options, min_cosine if precision == "auto" else None)
    choices: dict[str, TaskChoice] = {}
    unavailable: dict[str, str] = {}
    skipped: list[str] = []
    for task in bundle.tasks:
        choice, task_skipped = _choose_task(task, candidates_for(task), loader, max_timed, timer)
        skipped += [f"{task}: {s}" for s in task_skipped]
        if choice is None:
            unavailable[task] = "no runtime can serve it here: " + (
                "; ".join(task_skipped) or "no candidates"
            )
            continue
        choices[task] = choice
    skipped = [f"{name}: {why}" for name, why in loader.absent.items()] + skipped
    if not choices:
        raise BackendUnavailable(
            "no backend can serve this bundle here: " + ("; ".join(skipped) or "no candidates")
        )
    composite = PerTaskBackend({t: c.backend for t, c in choices.items()}, unavailable)
    embed = choices.get("embed")
    timed = any(c.timings for c in choices.values())
    return Selection(
        composite,
        what + (", timed here" if timed else ""),
        embed.cosine if embed is not None and embed.cosine_source == "measured" else None,
        skipped,
        dict(embed.timings) if embed is not None else {},
        choices,
    )
