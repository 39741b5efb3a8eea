"""ONNX Runtime: CPU, CUDA EP, TensorRT EP (the EPs when onnxruntime-gpu provides them)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..bundle import Bundle
from .base import Backend, BackendUnavailable, clean_reason, missing_modules

_logger = logging.getLogger("service")


def _pinned_cpus() -> int:
    """The CPUs this process may run on when fewer than the machine has (taskset, a container's cpuset),
    else 0. ONNX Runtime sizes its default pool by the machine's cores: on one allowed core of two, its
    two threads take turns on that core (batch-1 p50 11.2 ms vs 2.1 ms with one thread, one run here)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return 0
    return allowed if allowed < (os.cpu_count() or allowed) else 0


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    speed_order = ("fp16", "int8", "fp32")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sessions: dict[str, Any] = {}
        self._outputs: dict[str, list[str]] = {}

    @classmethod
    def probe(cls) -> str | None:
        return missing_modules("onnxruntime")

    def uses_cuda(self) -> bool:
        import onnxruntime as ort

        return self.options.device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers()

    def precisions(self, bundle: Bundle, task: str | None = None) -> list[str]:
        # fp16 graphs are slow on CPU (ORT upcasts op by op); int8 is slow on GPU: each only where it pays
        order = ("fp16", "fp32") if self.uses_cuda() else ("int8", "fp32")
        return [p for p in order if bundle.graph(task or "embed", p) is not None]

    def _providers(self, bundle: Bundle, task: str, precision: str) -> list[Any]:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if self.options.device == "cuda" and "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(
                "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)"
            )
        if not self.uses_cuda():
            return ["CPUExecutionProvider"]
        providers: list[Any] = []
        if "TensorrtExecutionProvider" in available:
            # one optimization profile over the batch axis, as the batcher will use it (a graph fixed
            # to one batch size, like detect's 1, gets exactly that)
            b = bundle.fixed_batch(task) or self.options.max_batch_size

            def profile(batch: int) -> str:
                return ",".join(
                    f"{t['name']}:{'x'.join(map(str, [batch, *t['shape'][1:]]))}"
                    for t in bundle.spec["tasks"][task]["inputs"]
                )

            trt: dict[str, Any] = {
                "trt_fp16_enable": precision == "fp16",
                "trt_profile_min_shapes": profile(1),
                "trt_profile_opt_shapes": profile(max(1, b // 2)),
                "trt_profile_max_shapes": profile(b),
            }
            if self.options.cache_dir is not None:
                trt.update(
                    trt_engine_cache_enable=True,
                    trt_engine_cache_path=str(self.options.cache_dir),
                    trt_timing_cache_enable=True,
                )
            providers.append(("TensorrtExecutionProvider", trt))
        providers += ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return providers

    def load(self, bundle: Bundle, precision: str = "fp32", tasks: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = self.options.threads or _pinned_cpus()
        if threads:
            opts.intra_op_num_threads = threads
        # no busy-waiting between ops: the event loop and the decode threads share these cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # errors only: detect.onnx's mask-pasting loop logs a shape warning on every request otherwise
        opts.log_severity_level = 3
        wanted = self.tasks_to_load(bundle, tasks)
        for task in wanted:
            path = bundle.graph(task, precision)
            task_precision = precision
            if path is None:
                if precision in ("fp16", "int8") and task != "embed":
                    path, task_precision = bundle.graph(task, "fp32"), "fp32"
                if path is None:
                    raise BackendUnavailable(f"the bundle has no {precision} graph for {task}")
            providers = self._providers(bundle, task, task_precision)
            try:
                # by path, never from bytes: ORT then finds the graph's external data (weights.bin) beside it
                sess = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:  # ORT raises many types: one clean line here, the full text in the log
                _logger.debug("onnxruntime cannot load %s", path.name, exc_info=True)
                self.unavailable[task] = f"onnxruntime cannot load {path.name}: {clean_reason(e)}"
                continue
            got = sess.get_providers()
            if self.options.device == "cuda" and "CUDAExecutionProvider" not in got:
                raise BackendUnavailable(f"onnxruntime fell back to {got} for {path.name} (no usable GPU)")
            self.device = "cuda" if "CUDAExecutionProvider" in got else "cpu"
            self._sessions[task] = sess
            self._outputs[task] = [o.name for o in sess.get_outputs()]
            self.task_precision[task] = task_precision
            _logger.debug("onnxruntime %s: %s on %s", task, path.name, got)
        if not self._sessions:
            raise BackendUnavailable("; ".join(self.unavailable.values()) or "no task to load")
        self.precision = precision
        self.capabilities = frozenset(self._sessions)

    def infer(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        # InferenceSession.run is thread-safe and releases the GIL
        return self._sessions[task].run(self._outputs[task][:1], inputs)[0]

    def infer_outputs(self, task: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._outputs[task]
        return dict(zip(names, self._sessions[task].run(names, inputs), strict=True))

    def close(self) -> None:
        self._sessions.clear()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["providers"] = {t: s.get_providers() for t, s in self._sessions.items()}
        return d
