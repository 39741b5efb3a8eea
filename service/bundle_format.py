"""The bundle format both sides share: its name and version, the spec.json schema, checksums, the parity
cosine and the GPU naming of engines.

Torch-free and FastAPI-free (numpy and the standard library; ``jsonschema`` only when validating), so the
exporter imports it as well as the service: the two cannot drift apart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "cae-bundle"
FORMAT_VERSION = 1
# Package data (pyproject ``package-data``): found the same way from a checkout, a wheel or the image.
SCHEMA_NAME = "spec_schema.json"
# The external-data file the graphs of a bundle share (spec.json ``external_data``; each weight stored once).
WEIGHTS_FILE = "weights.bin"


@functools.cache
def load_schema() -> dict[str, Any]:
    """The JSON schema of ``spec.json`` (read once per process)."""
    schema: dict[str, Any] = json.loads(resources.files(__package__).joinpath(SCHEMA_NAME).read_text())
    return schema


def validate_spec(spec: dict[str, Any]) -> None:
    """Check ``spec`` against the schema; raises ``jsonschema.ValidationError`` (ImportError without
    ``jsonschema``): callers word the error for their side."""
    import jsonschema

    jsonschema.validate(spec, load_schema())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Min over rows of the cosine between ``a`` and ``b`` [rows, ...] (flattened per row); two all-zero
    rows agree (1.0), and no rows at all is 1.0."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / (na * nb + 1e-30)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    return float(cos.min()) if cos.size else 1.0


def gpu_slug(name: str) -> str:
    """A GPU's name as it appears in engine file names and ``spec.json`` (``NVIDIA H100 80GB HBM3`` ->
    ``nvidia-h100-80gb-hbm3``): the exporter writes it, the service matches it."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
