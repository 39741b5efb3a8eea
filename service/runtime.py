"""Everything the routes share, loaded once by the app's lifespan.

Start-up order, and why: the bundle is read and every sha256 checked (never serve unverified graphs),
the backend chosen and loaded, each task warmed up with a real inference whose output shape and
finiteness are checked (a health check that never ran the model proves nothing), and only then the
batchers start and ``/readyz`` turns ready. Repeated inference failures turn readiness off again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .backends import Backend, BackendOptions, BackendUnavailable, Selection, select_backend
from .backends.select import parse_task_backends
from .batcher import MicroBatcher, Output
from .bundle import Bundle, BundleError, load_bundle
from .dense import check_outputs
from .errors import NotFound, NotReady, TaskUnsupported
from .imaging import Limits, Preprocessor, configure_pillow
from .metrics import Metrics
from .settings import Settings

_logger = logging.getLogger("service")

UNHEALTHY_AFTER = 3  # consecutive failed batches before /readyz reports unhealthy


class StartupError(RuntimeError):
    """The server cannot start; the message says why (a bad bundle, no usable backend, a failed warm-up)."""


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics, backend: Backend | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.status = "loading"
        self.detail: str | None = None
        self.bundle: Bundle | None = None
        self.backend: Backend | None = backend  # injected (tests, embedding) or chosen by select_backend
        self.selection: Selection | None = None
        self.preprocessor: Preprocessor | None = None  # the top-level image spec (embed, reconstruct)
        self.preprocessors: dict[str, Preprocessor] = {}  # per task (dense heads have their own size)
        self.unavailable: dict[str, str] = {}  # bundle task -> why it is not served (501)
        self.batchers: dict[str, MicroBatcher] = {}
        self.decode_pool = ThreadPoolExecutor(
            max_workers=settings.decode_workers, thread_name_prefix="cae-decode"
        )
        self._failures = 0
        self._last_probe = 0.0  # time.monotonic() of the last request let through while unhealthy

    # ---------------------------------------------------------------------------------------- state
    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def require_ready(self) -> None:
        if self.ready:
            return
        if self.status == "unhealthy":
            # Half-open: refused requests never reach the backend, so without a trial now and then a
            # transient failure (a GPU reset, a full disk) would keep the server unhealthy for good.
            now = time.monotonic()
            if now - self._last_probe >= self.settings.unhealthy_retry_s:
                self._last_probe = now
                return
        raise NotReady(f"not ready ({self.status})", headers={"Retry-After": "1"})

    def stuck(self) -> str | None:
        """Why the server cannot answer in time: an inference call running past the request deadline (a
        hung backend: every request would time out, so readiness must say so)."""
        limit = self.settings.request_timeout_s
        for task, b in self.batchers.items():
            running = b.running_for()
            if running > limit:
                return f"{task} inference running for {running:.0f}s (request_timeout_s {limit:g})"
        return None

    def batcher(self, task: str) -> MicroBatcher:
        """The task's batcher; 404 when the bundle has no such graph, 501 when the backend cannot run it."""
        self.require_ready()
        b = self.batchers.get(task)
        if b is None:
            assert self.bundle is not None and self.backend is not None
            if task in self.unavailable:
                raise TaskUnsupported(
                    f"{task} is not served by the {self.backend.name} backend: {self.unavailable[task]}"
                )
            raise NotFound(
                f"the loaded model ({self.bundle.model_id}) has no {task} graph; "
                f"serve a bundle exported with the {task} head",
                code="task_not_available",
            )
        return b

    def preprocessor_for(self, task: str) -> Preprocessor:
        pre = self.preprocessors.get(task, self.preprocessor)
        assert pre is not None
        return pre

    def _on_result(self, ok: bool) -> None:
        self._failures = 0 if ok else self._failures + 1
        if self._failures >= UNHEALTHY_AFTER and self.status == "ready":
            self.status, self.detail = "unhealthy", f"{self._failures} consecutive inference failures"
            self._last_probe = time.monotonic()
            self.metrics.ready.set(0)
            _logger.error("marking the server unhealthy: %s", self.detail)
        elif ok and self.status == "unhealthy":
            self.status, self.detail = "ready", None
            self.metrics.ready.set(1)

    # --------------------------------------------------------------------------------- start / stop
    def _load(self) -> None:
        """Blocking part of start-up (runs in a thread)."""
        s = self.settings
        configure_pillow(s.max_pixels)
        t0 = time.perf_counter()
        try:
            bundle = load_bundle(s.model_dir)
        except BundleError as e:
            raise StartupError(f"refusing to start: {e}") from None
        _logger.info(
            "bundle %s (%s) verified in %.2fs: tasks %s",
            bundle.model_id,
            bundle.path,
            time.perf_counter() - t0,
            ", ".join(bundle.tasks),
        )
        if self.backend is None:
            options = BackendOptions(
                device=s.device, threads=s.threads, cache_dir=s.cache_dir, max_batch_size=s.max_batch_size
            )
            try:
                pinned = parse_task_backends(s.task_backends)
                self.selection = select_backend(
                    bundle, s.backend, s.precision, options, s.min_cosine, pinned=pinned or None
                )
            except (BackendUnavailable, ValueError) as e:
                raise StartupError(f"refusing to start: {e}") from None
            self.backend = self.selection.backend
        else:
            self.backend.load(bundle, s.precision if s.precision != "auto" else "fp32")
            self.selection = Selection(self.backend, "given to create_app")
        b = self.backend
        sel = self.selection
        _logger.info(
            "backend %s %s on %s (%s%s)",
            b.name,
            b.precision,
            b.device,
            sel.reason,
            f"; measured cosine {sel.measured_cosine:.6f}" if sel.measured_cosine is not None else "",
        )
        for task, choice in sel.tasks.items():
            d = choice.describe()
            _logger.info(
                "  %s: %s %s%s%s",
                task,
                d["backend"],
                d["precision"],
                f", cosine {choice.cosine:.6f} ({choice.cosine_source})" if choice.cosine is not None else "",
                f", timed {d['images_per_s']} images/s" if d["images_per_s"] else "",
            )
        for line in sel.skipped:
            _logger.info("  skipped %s", line)
        self.bundle = bundle
        limits = Limits(s.max_pixels, s.min_side)
        self.preprocessor = Preprocessor(bundle.image, limits)
        self.preprocessors = {
            t: Preprocessor(spec, limits) for t, spec in bundle.task_images.items() if spec != bundle.image
        }
        self.unavailable = {
            t: b.unavailable.get(t, f"the {b.name} backend did not load it")
            for t in bundle.tasks
            if t not in b.capabilities
        }
        self._warm_up()

    def warmup_inputs(self, task: str, rows: int = 1) -> dict[str, np.ndarray]:
        """Inputs for one batch of ``task``, built from the spec's tensor list (so new task graphs need
        no code here): float tensors get noise, bool tensors (masks) the default mask ratio."""
        assert self.bundle is not None
        rng = np.random.default_rng(0)
        inputs: dict[str, np.ndarray] = {}
        rows = self.bundle.fixed_batch(task) or rows
        for t in self.bundle.spec["tasks"][task]["inputs"]:
            shape = (rows, *(int(d) for d in t["shape"][1:]))
            if t["dtype"] == "bool":
                x = np.zeros(shape, dtype=bool)
                n = shape[-1]
                x[..., : min(n - 1, max(1, int(round(self.bundle.default_mask_ratio * n))))] = True
            else:
                x = rng.standard_normal(shape).astype(t["dtype"])
            inputs[t["name"]] = x
        return inputs

    def per_image_outputs(self, task: str) -> bool:
        """Whether ``task``'s graph has several outputs: its batches then yield one {name: array} dict per
        image instead of one array (detect's outputs have no batch axis, so its graph runs one image)."""
        assert self.bundle is not None
        return len(self.bundle.spec["tasks"][task]["outputs"]) > 1

    def infer_fn(self, task: str) -> Callable[[dict[str, np.ndarray]], Output]:
        """What the task's batcher calls with a batch of inputs."""
        assert self.bundle is not None and self.backend is not None
        backend = self.backend
        if not self.per_image_outputs(task):
            return functools.partial(backend.infer, task)
        names = [t["name"] for t in self.bundle.spec["tasks"][task]["outputs"]]
        batch_axis = all(
            t["shape"] and t["shape"][0] == "batch" for t in self.bundle.spec["tasks"][task]["outputs"]
        )

        def run(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
            outs = backend.infer_outputs(task, inputs)
            if not set(names) <= set(outs):  # a runtime that renamed them: the spec's order is the contract
                if len(outs) != len(names):
                    raise ValueError(f"{task}: expected outputs {names}, got {list(outs)}")
                outs = dict(zip(names, outs.values(), strict=True))
            outs = {n: outs[n] for n in names}
            rows = len(next(iter(inputs.values())))
            if rows == 1 and not batch_axis:  # e.g. detect: one image per call, outputs without a batch axis
                return [outs]
            return [{n: v[i] for n, v in outs.items()} for i in range(rows)]  # batched multi-output graphs

        return run

    def _warm_up(self) -> None:
        assert self.bundle is not None and self.backend is not None
        for task in self.tasks():
            t0 = time.perf_counter()
            inputs = self.warmup_inputs(task)
            try:
                out = self.infer_fn(task)(inputs)
            except BackendUnavailable as e:  # this backend cannot run it: serve the rest, say why
                self.unavailable[task] = str(e)
                _logger.warning("%s is not served: %s", task, e)
                continue
            except Exception as e:
                raise StartupError(
                    f"refusing to start: warm-up {task} inference failed ({type(e).__name__})"
                ) from e
            try:
                check_outputs(self.bundle, task, out)
            except ValueError as e:
                raise StartupError(
                    f"refusing to start: warm-up {task} output breaks its contract: {e}"
                ) from e
            if isinstance(out, list):
                shapes = {k: list(v.shape) for k, v in out[0].items()}
                _logger.info("warm-up %s: outputs %s in %.3fs", task, shapes, time.perf_counter() - t0)
                continue
            if not isinstance(out, np.ndarray) or out.shape[0] != 1 or not np.isfinite(out).all():
                raise StartupError(f"refusing to start: warm-up {task} output is malformed or not finite")
            _logger.info("warm-up %s: output %s in %.3fs", task, list(out.shape), time.perf_counter() - t0)

    def tasks(self) -> list[str]:
        """The tasks served: in the bundle, run by the backend, and not found unusable at warm-up."""
        assert self.bundle is not None and self.backend is not None
        return [t for t in self.bundle.tasks if t in self.backend.capabilities and t not in self.unavailable]

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._load)
        except Exception as e:
            self.status, self.detail = "failed", str(e)
            raise
        assert self.backend is not None and self.bundle is not None
        s = self.settings
        cap = self.backend.max_batch_size
        max_batch = min(s.max_batch_size, cap) if cap else s.max_batch_size
        for task in self.tasks():
            fixed = self.bundle.fixed_batch(task)  # detect's graph runs one image per call
            batcher = MicroBatcher(
                task,
                self.infer_fn(task),
                max_batch_size=min(max_batch, fixed) if fixed else max_batch,
                max_wait_ms=s.max_wait_ms,
                queue_size=s.queue_size,
                metrics=self.metrics,
                on_result=self._on_result,
            )
            await batcher.start()
            self.batchers[task] = batcher
        self.metrics.model.info(
            {
                "model_id": self.bundle.model_id,
                "backend": self.backend.name,
                "precision": self.backend.precision,
                "device": self.backend.device,
            }
        )
        self.status = "ready"
        self.metrics.ready.set(1)
        _logger.info(
            "ready: %s on %s %s, max batch %d, max wait %.1f ms",
            self.bundle.model_id,
            self.backend.name,
            self.backend.precision,
            max_batch,
            s.max_wait_ms,
        )

    async def stop(self) -> None:
        if self.status in ("ready", "unhealthy"):
            self.status = "stopping"
        self.metrics.ready.set(0)
        await asyncio.gather(*(b.stop(self.settings.shutdown_timeout_s) for b in self.batchers.values()))
        if self.backend is not None:
            self.backend.close()
        self.decode_pool.shutdown(wait=False)
        _logger.info("stopped")

    # ----------------------------------------------------------------------------------------- info
    def model_card(self) -> dict[str, Any]:
        assert self.bundle is not None and self.backend is not None
        b, s = self.bundle, self.settings
        spec = b.spec
        return {
            "id": b.model_id,
            "tasks": self.tasks(),
            "unavailable_tasks": dict(self.unavailable),
            "backend": self.backend.describe(),
            "selection": self.selection.describe() if self.selection else {},
            "image": spec["image"],
            "embed_dim": b.embed_dim,
            "poolings": b.poolings,
            "default_pooling": b.default_pooling,
            "target": spec["target"],
            "limits": {
                "max_body_bytes": s.max_body_bytes,
                "max_concurrent_requests": s.max_concurrent_requests,
                "max_images_per_request": s.max_images_per_request,
                "max_pixels": s.max_pixels,
                "min_side": s.min_side,
                "max_batch_size": s.max_batch_size,
                "max_wait_ms": s.max_wait_ms,
                "queue_size": s.queue_size,
                "request_timeout_s": s.request_timeout_s,
            },
            "spec": spec,
        }
