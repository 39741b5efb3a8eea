"""What every exporter shares: the error type, the dynamo ONNX export, the CPU ONNX Runtime session used
by parity checks, the readouts a parity check compares, and spec validation against the bundle schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service import bundle_format


class ExportError(RuntimeError):
    """Export failed or a graph missed its parity bound; the message says which and by how much."""


def export_graph(module: nn.Module, args: tuple[Tensor, ...], path: Path, input_names: list[str],
                 output_names: list[str], opset: int) -> None:  # fmt: skip
    """``module`` to ``path`` with torch.export (dynamo), a dynamic batch axis on every input."""
    module.eval()  # inference graphs: no drop path, batch-norm statistics frozen (and no train-mode warning)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic_shapes = tuple({0: batch} for _ in args)
    try:
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
        )  # fmt: skip
        assert program is not None  # dynamo=True always returns the program
        program.save(str(path), external_data=False)
    except Exception as e:
        raise ExportError(f"ONNX export of {path.name} failed: {type(e).__name__}: {str(e)[:500]}") from e


def ort_session(path: Path) -> Any:
    """A CPU ONNX Runtime session on ``path`` with full graph optimization (the parity reference)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # Mask R-CNN's mask-pasting loop warns on every run about its traced shapes
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def pooled_readouts(outs: list[np.ndarray]) -> list[np.ndarray]:
    """Every served readout of an embed graph's outputs (cls, mean, and each block's cls/mean)."""
    tokens, blocks = outs[0], outs[1] if len(outs) > 1 else None
    pooled = [tokens[:, 0], tokens[:, 1:].mean(axis=1)]
    return pooled + ([blocks.reshape(len(blocks), -1)] if blocks is not None else [])


def validate_spec(spec: dict[str, Any]) -> None:
    """Refuse to write a ``spec.json`` the service would reject (ExportError naming the field)."""
    import jsonschema

    try:
        bundle_format.validate_spec(spec)
    except jsonschema.ValidationError as e:
        where = list(e.absolute_path)
        raise ExportError(
            f"spec.json does not match {bundle_format.SCHEMA_NAME}: {e.message} at {where}"
        ) from e
