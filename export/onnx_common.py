"""What every exporter shares: the error type, the dynamo ONNX export, the CPU ONNX Runtime session used
by parity checks, the readouts a parity check compares, spec validation against the bundle schema, and the
shared external-data file that stores each weight of a bundle's graphs once."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service import bundle_format

_logger = logging.getLogger("export")

WEIGHTS_FILE = bundle_format.WEIGHTS_FILE
# Tensors below this stay inline: shapes, scales and zero points cost more as external entries than as bytes.
INLINE_MAX_BYTES = 1024
_ALIGN = 64  # every external tensor: SIMD/cache-line aligned
_PAGE_ALIGN, _PAGE_MIN = 65536, 1 << 20  # large ones on any OS's mmap granularity (onnx's own rule)


class ExportError(RuntimeError):
    """Export failed or a graph missed its parity bound; the message says which and by how much."""


def export_graph(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int,
) -> None:
    """``module`` to ``path`` with torch.export (dynamo), a dynamic batch axis on every input."""
    module.eval()  # inference graphs: no drop path, batch-norm statistics frozen (and no train-mode warning)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic_shapes = tuple({0: batch} for _ in args)
    try:
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
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


def _initializers(graph: Any) -> Iterator[Any]:
    """Every initializer of ``graph`` and of its subgraphs (detect's Loop/If bodies carry their own)."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _initializers(g)


def _digests(model: Any) -> list[str]:
    return [hashlib.sha256(t.raw_data).hexdigest() for t in _initializers(model.graph)]


def _checker_passes(model: Any) -> bool:
    """Whether the self-contained graph passes ``onnx.checker``: ORT's fp16 converter writes graphs that
    are not topologically sorted, which every runtime accepts; those are held to the other checks only."""
    import onnx

    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        _logger.debug("onnx.checker already refuses the self-contained graph: %s", str(e)[:200])
        return False
    return True


def share_weights(
    graphs: Sequence[Path], name: str = WEIGHTS_FILE, inline_max_bytes: int = INLINE_MAX_BYTES
) -> dict[str, Any]:
    """Move the initializers of ``graphs`` (one bundle directory) into one external-data file ``name``
    beside them, each distinct tensor (sha256 of its raw bytes) stored once: the encoder that embed.onnx
    and reconstruct.onnx both carry, the int8 graphs' shared quantized blocks and fp32 biases. Each
    TensorProto keeps (location, offset, length) per the ONNX external-data spec; ONNX Runtime, OpenVINO
    and TensorRT's parser resolve ``location`` relative to the graph's directory. Returns the ``spec.json``
    entry for the file. Raises ExportError when a rewritten graph fails the checker or no longer holds the
    same weights (bit for bit) or ONNX Runtime cannot open it (the checker only where the self-contained
    graph passes it)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    if not graphs:
        raise ExportError("no graphs to share weights between")
    folder = graphs[0].parent
    if any(g.parent != folder for g in graphs):
        raise ExportError("shared weights: every graph must be in the bundle directory")
    stored: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
    models: list[tuple[Path, Any, list[str], bool]] = []
    references = 0
    tmp = folder / f"{name}.tmp"
    with open(tmp, "wb") as f:
        for path in graphs:
            model = onnx.load(str(path))  # with any external data it already has: re-sharing is idempotent
            before = _digests(model)
            checked = _checker_passes(model)
            for t in _initializers(model.graph):
                # typed fields (float_data, ...) hold only small tensors in our exporters: they stay inline
                if not t.HasField("raw_data") or len(t.raw_data) < inline_max_bytes:
                    continue
                key = hashlib.sha256(t.raw_data).hexdigest()
                if key not in stored:
                    align = _PAGE_ALIGN if len(t.raw_data) >= _PAGE_MIN else _ALIGN
                    f.write(b"\0" * (-f.tell() % align))
                    stored[key] = (f.tell(), len(t.raw_data))
                    f.write(t.raw_data)
                offset, length = stored[key]
                del t.external_data[:]  # a previous location (re-sharing) must not linger beside the new one
                set_external_data(t, name, offset, length)
                t.data_location = onnx.TensorProto.EXTERNAL
                t.ClearField("raw_data")
                references += 1
            models.append((path, model, before, checked))
        size = f.tell()
    tmp.replace(folder / name)  # before the graphs: a graph never points at bytes that are not there yet
    for path, model, before, checked in models:
        gtmp = path.with_name(path.name + ".tmp")
        gtmp.write_bytes(model.SerializeToString())
        gtmp.replace(path)
        try:
            if checked:  # by path: also checks each location stays inside the folder
                onnx.checker.check_model(str(path))
            if _digests(onnx.load(str(path))) != before:
                raise ExportError(f"{path.name}: weights differ after moving them to {name}")
            ort_session(path)
        except ExportError:
            raise
        except Exception as e:  # the checker and ORT raise their own types
            why = f"{type(e).__name__}: {str(e)[:300]}"
            raise ExportError(f"{path.name} with its weights in {name}: {why}") from e
    _logger.info(
        "%s: %d tensors (%.1f MB) for %d references in %s",
        name,
        len(stored),
        size / 1e6,
        references,
        ", ".join(p.name for p in graphs),
    )
    return {
        "bytes": size,
        "tensors": len(stored),
        "references": references,
        "inline_max_bytes": inline_max_bytes,
        "graphs": sorted(p.name for p in graphs),
    }
