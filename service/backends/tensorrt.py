"""Native TensorRT engines (``python -m export tensorrt`` writes them and lists them in ``spec.json``).

An engine runs only on the GPU model and TensorRT version that built it, so only engines whose ``gpu``
and ``tensorrt_version`` match this machine are candidates. Device memory is handled with cuda-python
(``cuda.bindings.runtime``), not torch, so the GPU image needs no torch. The batch is capped by the
engine's optimization profile; the reconstruct output (``num_masked`` rows) and the detect outputs
(``N`` detections) are data-dependent, so outputs go through an output allocator. Engines for the
optional dense heads (segment, detect) may be missing: those tasks are then reported unavailable
(``backend=auto`` prefers a backend that runs every task of the bundle).

Untested in CI (needs a CUDA GPU with TensorRT); the ONNX Runtime TensorRT EP is the tested GPU path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..bundle import DENSE_TASKS, Bundle
from ..bundle_format import gpu_slug
from .base import Backend, BackendUnavailable, missing_modules

_logger = logging.getLogger("service")


def _check(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class _DeviceBuffer:
    """A growable cudaMalloc block."""

    def __init__(self, cudart: Any) -> None:
        self.cudart, self.ptr, self.size = cudart, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.size:
            self.free()
            self.ptr, self.size = int(_check(self.cudart.cudaMalloc(max(nbytes, 256)))), max(nbytes, 256)
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            _check(self.cudart.cudaFree(self.ptr))
            self.ptr, self.size = 0, 0


class _Engine:
    def __init__(self, trt: Any, cudart: Any, blob: bytes) -> None:
        self.trt, self.cudart = trt, cudart
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(blob)
        if self.engine is None:
            raise BackendUnavailable(
                "TensorRT cannot deserialize the engine (another GPU or TensorRT version?)"
            )
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.buffers = {n: _DeviceBuffer(cudart) for n in self.names}
        self.stream = _check(cudart.cudaStreamCreate())
        self.lock = threading.Lock()
        self.allocator = self._make_allocator()
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.inputs[0], 0)
        self.max_batch = int(max_shape[0])

    def _make_allocator(self) -> Any:
        trt, buffers = self.trt, self.buffers

        class Allocator(trt.IOutputAllocator):  # type: ignore[misc,name-defined]  # untyped module
            def __init__(self) -> None:
                super().__init__()
                self.shapes: dict[str, tuple[int, ...]] = {}

            def reallocate_output(self, name: str, memory: int, size: int, alignment: int) -> int:
                return buffers[name].ensure(size)

            def notify_shape(self, name: str, shape: Any) -> None:
                self.shapes[name] = tuple(shape)

        return Allocator()

    def _dtype(self, name: str) -> Any:
        trt = self.trt
        dtypes = {
            trt.DataType.FLOAT: np.float32,
            trt.DataType.HALF: np.float16,
            trt.DataType.INT32: np.int32,
            trt.DataType.INT64: np.int64,
            trt.DataType.BOOL: np.bool_,
        }
        return dtypes[self.engine.get_tensor_dtype(name)]

    def run(self, feed: dict[str, np.ndarray], names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The outputs ``names`` (default: all, in engine order); float outputs as float32."""
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self.lock:
            host = {}
            for name in self.inputs:
                arr = np.ascontiguousarray(feed[name])
                host[name] = arr
                ptr = self.buffers[name].ensure(arr.nbytes)
                _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
                self.context.set_input_shape(name, arr.shape)
                self.context.set_tensor_address(name, ptr)
            for name in self.outputs:
                self.context.set_output_allocator(name, self.allocator)
            if not self.context.execute_async_v3(int(self.stream)):
                raise RuntimeError("TensorRT execution failed")
            outs: dict[str, np.ndarray] = {}
            for name in names or self.outputs:
                out = np.empty(self.allocator.shapes[name], dtype=self._dtype(name))
                if out.nbytes:  # detect may find nothing: an empty output has no buffer to copy
                    _check(
                        cudart.cudaMemcpyAsync(
                            out.ctypes.data, self.buffers[name].ptr, out.nbytes, d2h, self.stream
                        )
                    )
                outs[name] = out
            _check(cudart.cudaStreamSynchronize(self.stream))
            return {
                k: v.astype(np.float32, copy=False) if v.dtype == np.float16 else v for k, v in outs.items()
            }

    def close(self) -> None:
        for b in self.buffers.values():
            b.free()


class TensorRTBackend(Backend):
    name = "tensorrt"
    speed_order = ("fp16", "int8", "fp32")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._engines: dict[str, _Engine] = {}

    @classmethod
    def probe(cls) -> str | None:
        return missing_modules("tensorrt", "cuda")

    def _gpu(self) -> str | None:
        try:
            from cuda.bindings import runtime as cudart

            if _check(cudart.cudaGetDeviceCount()) < 1:
                return None
            name = _check(cudart.cudaGetDeviceProperties(0)).name
            return gpu_slug(name.decode() if isinstance(name, bytes) else str(name))
        except Exception:  # no driver, no device
            return None

    def _entries(self, bundle: Bundle, task: str) -> list[dict[str, Any]]:
        import tensorrt as trt

        gpu = self._gpu()
        return [
            e
            for e in bundle.spec["tasks"].get(task, {}).get("tensorrt", [])
            if e.get("gpu") == gpu and e.get("tensorrt_version") == trt.__version__
        ]

    def precisions(self, bundle: Bundle, task: str | None = None) -> list[str]:
        if self.options.device == "cpu":
            return []
        have = {e["precision"] for e in self._entries(bundle, task or "embed")}
        return [p for p in self.speed_order if p in have]

    def recorded_cosine(self, bundle: Bundle, precision: str, task: str = "embed") -> float | None:
        for e in self._entries(bundle, task):
            if e["precision"] == precision:
                value = e.get("parity", {}).get("min_cosine_vs_onnxruntime")
                return float(value) if value is not None else None
        return None

    def load(self, bundle: Bundle, precision: str = "fp32", tasks: Sequence[str] | None = None) -> None:
        if self.options.device == "cpu":
            raise BackendUnavailable("TensorRT needs a GPU (device=cpu)")
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        if self._gpu() is None:
            raise BackendUnavailable("no CUDA GPU visible")
        for task in self.tasks_to_load(bundle, tasks):
            entries = [e for e in self._entries(bundle, task) if e["precision"] == precision]
            if not entries and task in DENSE_TASKS:
                # optional heads: serve the rest, and say why these are missing (routes answer 501)
                self.unavailable[task] = (
                    f"no {precision} TensorRT engine for {task} built on this GPU with TensorRT "
                    f"{trt.__version__}; build one (python -m export tensorrt BUNDLE) or serve with "
                    "backend=onnxruntime"
                )
                continue
            if not entries:
                raise BackendUnavailable(
                    f"no {precision} TensorRT engine for {task} built on this GPU "
                    f"with TensorRT {trt.__version__} (python -m export tensorrt BUNDLE builds them)"
                )
            engine = _Engine(trt, cudart, (bundle.path / entries[-1]["file"]).read_bytes())
            self._engines[task] = engine
            self.task_precision[task] = precision
        # graphs fixed to one batch size (detect: 1) are capped per task by the runtime, not here
        self.max_batch_size = min(
            (e.max_batch for t, e in self._engines.items() if bundle.fixed_batch(t) is None), default=None
        )
        self.precision, self.device = precision, "cuda"
        self.capabilities = frozenset(self._engines)

    def infer(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        engine = self._engines[task]
        return engine.run(inputs, engine.outputs[:1])[engine.outputs[0]]

    def infer_outputs(self, task: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._engines[task].run(inputs)

    def close(self) -> None:
        for e in self._engines.values():
            e.close()
        self._engines.clear()
