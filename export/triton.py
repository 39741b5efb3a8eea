"""``python -m export triton BUNDLE REPO``: an NVIDIA Triton model repository from a model bundle.

For every task in the bundle this writes ``REPO/<prefix>_<task>/config.pbtxt`` and ``1/model.onnx``
(platform ``onnxruntime_onnx``), and, when the bundle holds TensorRT engines (``python -m export
tensorrt``), ``REPO/<prefix>_<task>_trt`` with ``1/model.plan`` (platform ``tensorrt_plan``). The batch
dimension becomes Triton's implicit one (``max_batch_size``). ``embed`` gets dynamic batching;
``reconstruct`` does not, because one batch must share a masked-patch count and requests differ in it.
Configs are checked against Triton's own ``ModelConfig`` protobuf when ``tritonclient`` is installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

_logger = logging.getLogger("export")

_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bool": "TYPE_BOOL",
    "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8",
}


class TritonError(RuntimeError):
    pass


def batched(entry: dict[str, Any]) -> bool:
    """Whether a task's graph has a leading batch axis on every input (``detect`` is fixed to one image)."""
    return all(t["shape"] and t["shape"][0] == "batch" for t in entry["inputs"])


def _dims(shape: list[Any], has_batch: bool = True) -> list[int]:
    """Bundle shape without the batch axis (all axes for unbatched graphs, which Triton serves with
    ``max_batch_size: 0``); symbolic sizes (e.g. ``num_masked``, ``num_detections``) become -1."""
    if has_batch:
        if not shape or shape[0] != "batch":
            raise TritonError(f"expected a leading batch axis, got {shape}")
        shape = shape[1:]
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor_block(kind: str, tensors: list[dict[str, Any]], has_batch: bool = True) -> str:
    items = []
    for t in tensors:
        dims = ", ".join(str(d) for d in _dims(t["shape"], has_batch))
        items.append(
            f'  {{\n    name: "{t["name"]}"\n    data_type: {_DTYPES[t["dtype"]]}\n    dims: [ {dims} ]\n  }}'
        )
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def model_config(
    name: str,
    task: str,
    entry: dict[str, Any],
    platform: str,
    max_batch_size: int,
    instance_kind: str,
    instances: int,
    max_queue_delay_us: int,
) -> str:
    has_batch = batched(entry)
    if not has_batch:
        max_batch_size = 0  # Triton's rule for graphs without an implicit batch axis
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}"]
    text = "\n".join(lines) + "\n"
    text += _tensor_block("input", entry["inputs"], has_batch)
    text += _tensor_block("output", entry["outputs"], has_batch)
    if task in ("embed", "segment") and has_batch:
        preferred = [b for b in (4, 8, 16, 32, 64) if b <= max_batch_size]
        text += "dynamic_batching {\n"
        if preferred:
            text += f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        text += f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
    text += f"instance_group [\n  {{\n    count: {instances}\n    kind: {instance_kind}\n  }}\n]\n"
    return text


def validate_config(text: str) -> None:
    """Parse with Triton's ModelConfig protobuf (field names, enums, types), when available."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        _logger.info("tritonclient not installed: config.pbtxt not checked against Triton's schema")
        return
    try:
        cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise TritonError(f"config.pbtxt rejected by Triton's ModelConfig schema: {e}") from e
    # rules Triton enforces at load time that the protobuf alone does not
    if cfg.max_batch_size < 0:
        raise TritonError("max_batch_size must be >= 0")
    for t in list(cfg.input) + list(cfg.output):
        if not t.dims or any(d == 0 or d < -1 for d in t.dims):
            raise TritonError(f"tensor {t.name}: dims must be positive or -1, got {list(t.dims)}")
    if cfg.HasField("dynamic_batching") and cfg.max_batch_size == 0:
        raise TritonError("dynamic_batching needs max_batch_size > 0")


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (the shared weights once on disk for every model), else a copy."""
    if not src.is_file():
        raise TritonError(f"{src}: listed in spec.json but missing")
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(src, dst)


def export_triton(
    bundle: str | Path,
    repo: str | Path,
    prefix: str = "cae",
    max_batch_size: int = 64,
    instance_kind: str = "KIND_GPU",
    instances: int = 1,
    max_queue_delay_us: int = 2000,
) -> list[Path]:
    bundle, repo = Path(bundle), Path(repo)
    spec_path = bundle / "spec.json"
    if not spec_path.exists():
        raise TritonError(f"{bundle}: no spec.json (write a bundle with `python -m export onnx` first)")
    spec = json.loads(spec_path.read_text())
    if instance_kind not in ("KIND_GPU", "KIND_CPU"):
        raise TritonError(f"instance kind must be KIND_GPU or KIND_CPU, got {instance_kind}")
    written = []
    for task, entry in spec["tasks"].items():
        targets = [("onnxruntime_onnx", entry["file"], f"{prefix}_{task}", "model.onnx")]
        for engine in entry.get("tensorrt", []):
            targets.append(("tensorrt_plan", engine["file"], f"{prefix}_{task}_trt", "model.plan"))
        for platform, src_name, name, dst_name in targets:
            src = bundle / src_name
            if not src.exists():
                raise TritonError(f"{src}: listed in spec.json but missing")
            kind = "KIND_GPU" if platform == "tensorrt_plan" else instance_kind
            text = model_config(
                name, task, entry, platform, max_batch_size, kind, instances, max_queue_delay_us
            )
            validate_config(text)
            model_dir = repo / name
            (model_dir / "1").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, model_dir / "1" / dst_name)
            if platform == "onnxruntime_onnx":
                for shared in spec.get("external_data") or {}:  # weights.bin: resolved beside model.onnx
                    _link_or_copy(bundle / shared, model_dir / "1" / shared)
            (model_dir / "config.pbtxt").write_text(text)
            # the bundle's spec travels along: clients read preprocessing from it
            shutil.copyfile(spec_path, model_dir / "spec.json")
            written.append(model_dir)
            _logger.info("wrote Triton model %s (%s)", model_dir, platform)
    return written
