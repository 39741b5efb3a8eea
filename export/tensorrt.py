"""``python -m export tensorrt BUNDLE``: TensorRT engines from a bundle's ONNX graphs, checked against ONNX
Runtime.

Engines are built with the TensorRT Python API: one optimization profile over the batch axis
(min/opt/max), a persistent timing cache (``timing.cache`` in the bundle, reused across builds), FP16
and INT8 (with a calibrator over real images from ``--calib-dir``) as options. Each engine is named by
model hash, GPU and TensorRT version (``embed.<hash12>.<gpu>.trt<ver>.<prec>.plan``) because an engine
only runs on the GPU model and TensorRT version that built it; ``spec.json`` lists them under
``tasks.<task>.tensorrt`` with their parity against ONNX Runtime.

Needs a CUDA GPU, ``tensorrt`` (extra ``trt``) and torch with CUDA for the device buffers of the check.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle_format import gpu_slug, min_row_cosine, sha256_file

from .onnx_common import ort_session, pooled_readouts, validate_spec

_logger = logging.getLogger("export")


class TensorRTError(RuntimeError):
    pass


def _require() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTError(
            "TensorRT is not installed: pip install -e '.[trt]' on a machine with a CUDA GPU"
        ) from e
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("TensorRT engines need a CUDA GPU; none is visible")
    return trt


def _calibration_batches(
    calib_dir: Path, spec: dict[str, Any], batch: int, limit: int = 512
) -> list[np.ndarray]:
    from PIL import Image

    img = spec["image"]
    mean, std = np.array(img["mean"], np.float32), np.array(img["std"], np.float32)
    paths = sorted(p for p in calib_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))[
        :limit
    ]
    if not paths:
        raise TensorRTError(f"--calib-dir {calib_dir}: no images")
    arrs = []
    for p in paths:
        with Image.open(p) as im:
            x = np.asarray(
                im.convert("RGB").resize((img["size"], img["size"]), Image.Resampling.BICUBIC), np.float32
            )
        arrs.append(((x / 255.0 - mean) / std).transpose(2, 0, 1))
    data = np.stack(arrs).astype(np.float32)
    return [data[i : i + batch] for i in range(0, len(data) - batch + 1, batch)]


def _make_calibrator(trt: Any, batches: list[np.ndarray], cache_path: Path) -> Any:
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]  # untyped module
        def __init__(self) -> None:
            super().__init__()
            self.batches = iter(batches)
            self.device = torch.empty(batches[0].shape, dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return int(batches[0].shape[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                b = next(self.batches)
            except StopIteration:
                return None
            self.device.copy_(torch.from_numpy(b))
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.exists() else None

        def write_calibration_cache(self, cache: bytes) -> None:
            cache_path.write_bytes(bytes(cache))

    return Calibrator()


def build_engine(
    onnx_path: Path,
    entry: dict[str, Any],
    out_path: Path,
    timing_cache: Path,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    fp16: bool,
    calibrator: Any = None,
    workspace_gib: float = 4.0,
) -> None:
    trt = _require()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # with the model's path: the parser resolves external data (the bundle's weights.bin) relative to it
    if not parser.parse(onnx_path.read_bytes(), path=str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if calibrator is not None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
    profile = builder.create_optimization_profile()
    for t in entry["inputs"]:
        rest = tuple(t["shape"][1:])
        profile.set_shape(t["name"], (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    if calibrator is not None:
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine for {onnx_path.name}")
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out_path)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


class EngineRunner:
    """Runs a serialized engine on CUDA buffers (torch tensors); handles data-dependent output shapes
    (``num_masked``) with an output allocator."""

    def __init__(self, path: Path) -> None:
        trt = _require()
        import torch

        self.trt, self.torch = trt, torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"{path}: cannot deserialize (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, torch = self.trt, self.torch
        keep = []

        class Allocator(trt.IOutputAllocator):  # type: ignore[misc,name-defined]  # untyped module
            def __init__(self) -> None:
                super().__init__()
                self.buffers: dict[str, Any] = {}
                self.shapes: dict[str, tuple[int, ...]] = {}

            def reallocate_output(self, name: str, memory: int, size: int, alignment: int) -> int:
                buf = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
                self.buffers[name] = buf
                return int(buf.data_ptr())

            def notify_shape(self, name: str, shape: Any) -> None:
                self.shapes[name] = tuple(shape)

        alloc = Allocator()
        for name in self.names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                t = torch.from_numpy(np.ascontiguousarray(feed[name])).cuda()
                keep.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, int(t.data_ptr()))
            else:
                self.context.set_output_allocator(name, alloc)
        stream = torch.cuda.Stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError("TensorRT execution failed")
        stream.synchronize()
        out = {}
        for name, buf in alloc.buffers.items():
            shape = alloc.shapes[name]
            dtype = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}[
                self.engine.get_tensor_dtype(name)
            ]
            n = int(np.prod(shape))
            out[name] = buf.view(dtype)[:n].reshape(shape).float().cpu().numpy()
        return out


def export_tensorrt(
    bundle: str | Path,
    fp16: bool = False,
    int8: bool = False,
    calib_dir: str | Path | None = None,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 64,
) -> dict[str, Any]:
    trt = _require()
    import torch

    bundle = Path(bundle)
    spec_path = bundle / "spec.json"
    if not spec_path.exists():
        raise TensorRTError(f"{bundle}: no spec.json (write a bundle with `python -m export onnx` first)")
    if int8 and not calib_dir:
        raise TensorRTError("--int8 needs --calib-dir with real images for calibration")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise TensorRTError(
            f"need 1 <= min-batch <= opt-batch <= max-batch, got {min_batch}, {opt_batch}, {max_batch}"
        )
    spec = json.loads(spec_path.read_text())
    gpu = gpu_slug(torch.cuda.get_device_name(0))
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    model_hash = spec["model"]["source_sha256"][:12]
    timing_cache = bundle / "timing.cache"
    rng = np.random.default_rng(0)
    img = spec["image"]
    for task, entry in spec["tasks"].items():
        onnx_path = bundle / entry["file"]
        name = f"{task}.{model_hash}.{gpu}.trt{trt.__version__}.{precision}.plan"
        calibrator = None
        if int8:
            if task != "embed":
                _logger.info("int8 calibration covers embed only; %s gets an fp16 engine", task)
            else:
                assert calib_dir is not None  # checked above
                batches = _calibration_batches(Path(calib_dir), spec, opt_batch)
                calibrator = _make_calibrator(trt, batches, bundle / f"{task}.int8.calib")
        build_engine(
            onnx_path,
            entry,
            bundle / name,
            timing_cache,
            min_batch,
            opt_batch,
            max_batch,
            fp16=fp16 or int8,
            calibrator=calibrator,
        )
        # parity against ONNX Runtime on fresh inputs at two batch sizes
        runner, ref = EngineRunner(bundle / name), ort_session(onnx_path)
        worst = 1.0
        for b in sorted({min_batch, opt_batch}):
            x = rng.standard_normal((b, img["channels"], img["size"], img["size"])).astype(np.float32)
            feed = {"images": x}
            if task == "reconstruct":
                n = img["num_patches"]
                m = np.zeros((b, n), dtype=bool)
                m[:, rng.choice(n, n // 2, replace=False)] = True
                feed["mask"] = m
            outs, theirs = runner(feed), ref.run(None, feed)
            ours = [outs[o["name"]] for o in entry["outputs"]]
            if task == "embed":  # every readout /embed serves (as the fp16/int8 variants are checked)
                pairs = zip(pooled_readouts(ours), pooled_readouts(theirs), strict=True)
            else:
                pairs = zip(ours[:1], theirs[:1], strict=True)
            worst = min(worst, *(min_row_cosine(a, b) for a, b in pairs))
        bound = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}[precision]
        if worst < bound:
            raise TensorRTError(f"{name}: cosine to ONNX Runtime {worst:.6f} < {bound}")
        entry.setdefault("tensorrt", [])
        entry["tensorrt"] = [e for e in entry["tensorrt"] if e["file"] != name] + [
            {
                "file": name,
                "precision": precision,
                "gpu": gpu,
                "tensorrt_version": trt.__version__,
                "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
                "parity": {"min_cosine_vs_onnxruntime": worst, "bound_min_cosine": bound},
            }
        ]
        _logger.info("%s: cosine to ONNX Runtime %.6f", name, worst)
    shared = set(spec.get("external_data") or {})  # the graphs' weights.bin stays listed
    spec["files"] = {
        p.name: sha256_file(p)
        for p in sorted(bundle.iterdir())
        if p.suffix in (".onnx", ".plan") or p.name in shared
    }
    validate_spec(spec)
    tmp = bundle / "spec.json.tmp"
    tmp.write_text(json.dumps(spec, indent=2))
    tmp.replace(spec_path)
    return spec
