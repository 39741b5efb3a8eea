"""OpenVINO on CPU: fp32, or bf16 on CPUs with AMX / AVX-512-BF16 (several times ONNX Runtime fp32 there).

The bf16 graph is the fp32 ONNX compiled with ``INFERENCE_PRECISION_HINT=bf16``; the bundle records no
parity for it, so the selector measures it against fp32 at start-up before choosing it automatically.
Inference requests are pooled (one per concurrent caller) because a request is not thread-safe.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..bundle import Bundle
from .base import Backend, BackendUnavailable, clean_reason, missing_modules

_logger = logging.getLogger("service")

_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
_POOL = 2  # concurrent infer requests per task (the batcher runs one batch per task at a time)


def cpu_has_bf16() -> bool:
    import openvino as ov

    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # an exotic plugin build without the property: assume no
        return False


class OpenVinoBackend(Backend):
    name = "openvino"
    speed_order = ("bf16", "fp32")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._compiled: dict[str, Any] = {}
        self._requests: dict[str, queue.Queue[Any]] = {}
        self._outputs: dict[str, list[str]] = {}

    @classmethod
    def probe(cls) -> str | None:
        return missing_modules("openvino")

    def precisions(self, bundle: Bundle, task: str | None = None) -> list[str]:
        if self.options.device == "cuda":
            return []
        return ["bf16", "fp32"] if cpu_has_bf16() else ["fp32"]

    def recorded_cosine(self, bundle: Bundle, precision: str, task: str = "embed") -> float | None:
        return 1.0 if precision == "fp32" else None  # bf16 is measured by the selector

    def load(self, bundle: Bundle, precision: str = "fp32", tasks: Sequence[str] | None = None) -> None:
        import openvino as ov

        if self.options.device == "cuda":
            raise BackendUnavailable("the openvino backend runs on CPU only")
        if precision not in _HINTS:
            raise BackendUnavailable(f"openvino: unknown precision {precision}")
        if precision == "bf16" and not cpu_has_bf16():
            raise BackendUnavailable("openvino bf16 needs a CPU with AMX or AVX-512-BF16")
        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if self.options.threads:
            config["INFERENCE_NUM_THREADS"] = self.options.threads
        for task in self.tasks_to_load(bundle, tasks):
            graph_precision = "int8" if precision == "int8" else "fp32"
            path = bundle.graph(task, graph_precision) or bundle.graph(task, "fp32")
            if path is None:
                raise BackendUnavailable(f"the bundle has no graph for {task}")
            try:
                # read_model by path: external data (weights.bin) resolves relative to the graph
                compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            except (
                Exception
            ) as e:  # multi-line reports with C++ source paths: one clean line, full text logged
                _logger.debug("openvino cannot compile %s", path.name, exc_info=True)
                self.unavailable[task] = f"openvino cannot compile {path.name}: {clean_reason(e)}"
                continue
            pool: queue.Queue[Any] = queue.Queue()
            for _ in range(_POOL):
                pool.put(compiled.create_infer_request())
            self._compiled[task], self._requests[task] = compiled, pool
            self._outputs[task] = [o.get_any_name() for o in compiled.outputs]
            self.task_precision[task] = precision
        if not self._compiled:
            raise BackendUnavailable("; ".join(self.unavailable.values()) or "no task to load")
        self.precision = precision
        self.capabilities = frozenset(self._compiled)

    def infer(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        pool = self._requests[task]
        request = pool.get()
        try:
            request.infer(inputs)
            # the output buffer belongs to the request and is reused by its next call
            return np.array(request.get_output_tensor(0).data, copy=True)
        finally:
            pool.put(request)

    def infer_outputs(self, task: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pool = self._requests[task]
        request = pool.get()
        try:
            request.infer(inputs)
            return {
                name: np.array(request.get_output_tensor(i).data, copy=True)
                for i, name in enumerate(self._outputs[task])
            }
        finally:
            pool.put(request)

    def close(self) -> None:
        self._requests.clear()
        self._compiled.clear()
