"""The one small interface every inference runtime implements.

A backend runs a bundle's task graphs (``embed``, ``reconstruct``, ``segment``, ``detect``) on numpy
arrays: ``infer(task, {input name: array with a batch axis}) -> first output``, and
``infer_outputs(task, inputs) -> {output name: array}`` (every output, in graph order) for graphs with
several outputs (``detect``: boxes, labels, scores, masks). It knows nothing about HTTP, images or
batching. A task the bundle has but this backend cannot run is left out of ``capabilities`` and listed
in ``unavailable`` with the reason (the routes answer 501 with it). Runtimes are imported inside
``load`` only, so merely importing this package never pulls in onnxruntime, OpenVINO, TensorRT or torch.
"""

from __future__ import annotations

import importlib.util
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..bundle import Bundle


class BackendUnavailable(RuntimeError):
    """This backend cannot run here or cannot run this bundle; the message says why."""


@dataclass(frozen=True)
class BackendOptions:
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # intra-op threads; 0 = the runtime's default
    cache_dir: Path | None = None  # for runtimes that build engines (TensorRT EP)
    max_batch_size: int = 32  # the batcher's largest batch (engine profiles are built for it)


_SOURCE_REF = re.compile(r"\S*\.(?:cpp|cc|cxx|hpp|h|py):\d+:?")
_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.+-]+/)+([\w.+-]+)")  # /any/dir/file.onnx -> file.onnx
_NOISE = re.compile(
    r"^(?:Exception from|Check '.*' failed at|FrontEnd API failed|Model wasn't fully converted|"
    r"Failed operations detailed log|Summary:?$)"
)


def clean_reason(err: BaseException | str, limit: int = 200) -> str:
    """A runtime's exception as one short line that names the problem: no C++/Python source locations, no
    directories (a file keeps its name), no multi-line dumps (the full text goes to the debug log).
    OpenVINO's conversion reports become "cannot convert operation Loop-18"."""
    text = str(err)
    failed = re.search(r"Conversion is failed for:\s*(.+)", text)
    if failed:
        return f"cannot convert operation {failed.group(1).strip().rstrip('.')}"
    lines = []
    for line in text.splitlines():
        line = _ABS_PATH.sub(r"\1", _SOURCE_REF.sub("", line)).strip(" :-")
        if line and not _NOISE.match(line):
            lines.append(line)
    out = " ".join(lines) or (type(err).__name__ if isinstance(err, BaseException) else "unknown error")
    out = re.sub(r"\s+", " ", out).strip()
    return out if len(out) <= limit else out[: limit - 3].rstrip() + "..."


def missing_modules(*names: str) -> str | None:
    """A reason string if any module is not installed (checked without importing it)."""
    absent = [n for n in names if importlib.util.find_spec(n) is None]
    return f"not installed: {', '.join(absent)}" if absent else None


class Backend(ABC):
    name: ClassVar[str]
    #: precisions this backend can run, fastest first (``precisions`` filters them for a bundle)
    speed_order: ClassVar[tuple[str, ...]] = ("fp32",)

    def __init__(self, options: BackendOptions | None = None) -> None:
        self.options = options or BackendOptions()
        self.precision = "fp32"
        self.device = "cpu"
        self.task_precision: dict[str, str] = {}
        self.capabilities: frozenset[str] = frozenset()
        self.unavailable: dict[str, str] = {}  # task -> why this backend cannot run it
        self.max_batch_size: int | None = None  # a hard cap of the runtime (engine profile), if any

    @classmethod
    def probe(cls) -> str | None:
        """None if the runtime is importable, else why not (cheap: imports nothing)."""
        return None

    def precisions(self, bundle: Bundle, task: str | None = None) -> list[str]:
        """Precisions this backend could run for ``bundle`` (for ``task``, or any task), fastest first."""
        tasks = [task] if task else bundle.tasks
        return [p for p in self.speed_order if any(bundle.graph(t, p) is not None for t in tasks)]

    def recorded_cosine(self, bundle: Bundle, precision: str, task: str = "embed") -> float | None:
        """The exporter's measured cosine to fp32 of ``task``'s output at this precision (1.0 for fp32,
        None if unmeasured)."""
        if precision == "fp32":
            return 1.0
        return bundle.recorded_cosine(task, precision)

    @staticmethod
    def tasks_to_load(bundle: Bundle, tasks: Sequence[str] | None) -> list[str]:
        """``tasks`` (default: every task of the bundle), in the bundle's order."""
        return [t for t in bundle.tasks if tasks is None or t in tasks]

    @abstractmethod
    def load(self, bundle: Bundle, precision: str = "fp32", tasks: Sequence[str] | None = None) -> None:
        """Prepare ``tasks`` of ``bundle`` (default: all). A graph this runtime cannot compile leaves its
        task out of ``capabilities`` with a one-line reason in ``unavailable``; raise BackendUnavailable
        when the runtime cannot run here at all or no requested task could be loaded."""

    @abstractmethod
    def infer(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run ``task`` on one batch; returns the graph's first output. Called from worker threads."""

    def infer_outputs(self, task: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``task`` on one batch; every output by name, in graph order. Called from worker threads.

        Runtimes that serve multi-output graphs override this; the default refuses clearly (the
        runtime then reports the task unavailable instead of serving a partial result)."""
        raise BackendUnavailable(f"the {self.name} backend returns only the first output of a graph")

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release runtime resources."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "device": self.device,
            "task_precision": dict(self.task_precision),
            "tasks": sorted(self.capabilities),
            "unavailable": dict(self.unavailable),
            "max_batch_size": self.max_batch_size,
        }
