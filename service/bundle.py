"""Reading a model bundle (``export/onnx_export.py`` writes it) and refusing a damaged one.

A bundle is trusted only after every file ``spec.json`` lists matches its sha256, and every graph the
spec references is among those files: a server must never load a graph nobody checked. Graphs may keep
their weights in a shared ONNX external-data file (``external_data``, e.g. ``weights.bin``): it is listed
and checked like a graph, and the runtimes find it because every backend loads graphs by path, from the
bundle directory. A graph can only point at files its exporter wrote, as its own bytes are checked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle_format import FORMAT, FORMAT_VERSION, SCHEMA_NAME, sha256_file, validate_spec

_logger = logging.getLogger("service")

DENSE_TASKS = ("segment", "detect")  # tasks whose entries carry ``classes`` (and optionally ``image``)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")


class BundleError(RuntimeError):
    """The bundle is missing, malformed, or altered; the message says which file and how."""


@dataclass(frozen=True)
class ImageSpec:
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    patch_size: int
    grid: tuple[int, int]
    num_patches: int
    channels: int


@dataclass(frozen=True)
class Bundle:
    path: Path
    spec: dict[str, Any] = field(repr=False)
    model_id: str
    image: ImageSpec
    embed_dim: int
    target_type: str  # "pixel" | "dalle"
    pred_dim: int
    norm_pix_loss: bool
    default_mask_ratio: float
    class_names: list[str] | None
    # per-task preprocessing (dense heads run at their own size); tasks absent here use ``image``
    task_images: dict[str, ImageSpec] = field(default_factory=dict, repr=False)

    @property
    def tasks(self) -> list[str]:
        return list(self.spec["tasks"])

    def image_for(self, task: str) -> ImageSpec:
        """The preprocessing of ``task``'s inputs: its own ``image`` entry, else the top-level one."""
        return self.task_images.get(task, self.image)

    def classes(self, task: str) -> list[str]:
        """Class names of a dense task (index = the label id its graph outputs; 0 is background)."""
        return list(self.spec["tasks"].get(task, {}).get("classes") or [])

    @property
    def poolings(self) -> list[str]:
        """The ``/embed`` readouts this bundle's embed graph supports (bundles whose graph returns only the
        tokens: cls, mean, none)."""
        return list(self.spec["tasks"].get("embed", {}).get("poolings") or ["cls", "mean", "none"])

    @property
    def default_pooling(self) -> str:
        """The readout the model card's numbers were measured on: what ``/embed`` returns by default."""
        return str(self.spec["tasks"].get("embed", {}).get("default_pooling") or "cls")

    def fixed_batch(self, task: str) -> int | None:
        """The batch size the task's graph is fixed to (an integer first input dim), None if dynamic."""
        dim = self.spec["tasks"][task]["inputs"][0]["shape"][0]
        return dim if isinstance(dim, int) and not isinstance(dim, bool) else None

    def graph(self, task: str, precision: str) -> Path | None:
        """The ONNX file of ``task`` at ``precision`` (fp32 = the main graph), or None if not exported."""
        entry = self.spec["tasks"].get(task)
        if entry is None:
            return None
        if precision == entry.get("precision", "fp32"):
            return self.path / entry["file"]
        variant = entry.get("variants", {}).get(precision)
        return self.path / variant["file"] if variant else None

    def recorded_cosine(self, task: str, precision: str) -> float | None:
        """The exporter's measured cosine of a reduced-precision variant to fp32 (None if unknown)."""
        variant = self.spec["tasks"].get(task, {}).get("variants", {}).get(precision)
        if not variant:
            return None
        value = variant.get("parity", {}).get("min_cosine_pooled")
        return float(value) if value is not None else None


def _image_spec(img: dict[str, Any]) -> ImageSpec:
    return ImageSpec(
        size=int(img["size"]),
        mean=tuple(map(float, img["mean"])),
        std=tuple(map(float, img["std"])),
        interpolation=str(img["interpolation"]),
        patch_size=int(img["patch_size"]),
        grid=(int(img["grid"][0]), int(img["grid"][1])),
        num_patches=int(img["num_patches"]),
        channels=int(img["channels"]),
    )


def _validate_schema(spec: dict[str, Any]) -> None:
    try:
        import jsonschema
    except ImportError:
        _logger.info("jsonschema not installed: spec.json checked field by field only")
        return
    try:
        validate_spec(spec)
    except FileNotFoundError:  # a broken install: the schema is package data
        _logger.info("%s missing from the service package: spec.json checked field by field", SCHEMA_NAME)
        return
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise BundleError(f"spec.json does not match the bundle schema at {where}: {e.message}") from None


def _referenced_files(spec: dict[str, Any]) -> set[str]:
    names = set(spec.get("external_data") or {})
    for entry in spec["tasks"].values():
        names.add(entry["file"])
        names.update(v["file"] for v in entry.get("variants", {}).values())
        names.update(e["file"] for e in entry.get("tensorrt", []))
    return names


def _what(spec: dict[str, Any], name: str) -> str:
    """`` (the shared weights of a.onnx, b.onnx)`` for an external-data file, else ''."""
    shared = (spec.get("external_data") or {}).get(name)
    return f" (the shared weights of {', '.join(shared.get('graphs', []))})" if shared else ""


def check_external_data(path: Path, spec: dict[str, Any]) -> None:
    """Each shared external-data file is present at its recorded size: cheap, so done even without
    ``verify`` (a graph would otherwise fail to load with a runtime's own, less clear, message)."""
    for name, entry in sorted((spec.get("external_data") or {}).items()):
        if Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"spec.json lists an invalid external-data file name {name!r}")
        f = path / name
        if not f.is_file():
            raise BundleError(f"{f}: missing{_what(spec, name)}; re-export or restore the bundle")
        size = f.stat().st_size
        if size != int(entry["bytes"]):
            raise BundleError(
                f"{f}: {size} bytes, spec.json records {entry['bytes']}{_what(spec, name)}: truncated or "
                "replaced; re-export or restore the bundle"
            )


def verify_files(path: Path, spec: dict[str, Any]) -> None:
    files: dict[str, str] = spec.get("files") or {}
    unlisted = sorted(_referenced_files(spec) - set(files))
    if unlisted:
        raise BundleError(f"spec.json references {unlisted} without a sha256 for them; re-export the bundle")
    check_external_data(path, spec)
    for name, expected in sorted(files.items()):
        if Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"spec.json lists an invalid file name {name!r}")
        f = path / name
        if not f.is_file():
            raise BundleError(f"{f}: missing (spec.json lists it); re-export or restore the bundle")
        found = sha256_file(f)
        if found != expected:
            raise BundleError(
                f"{f}: sha256 mismatch (spec.json {expected[:12]}..., file {found[:12]}...)"
                f"{_what(spec, name)}: the file was altered or corrupted; re-export or restore the bundle"
            )


def load_bundle(path: str | Path, verify: bool = True, spec_only: bool = False) -> Bundle:
    """Read ``spec.json`` in ``path``, validate it and (``verify``) check every file's sha256.

    ``spec_only``: no file beside ``spec.json`` is looked at (for a client that only needs the
    preprocessing, e.g. of a Triton model directory whose graphs live in version subfolders)."""
    path = Path(path)
    spec_path = path / "spec.json"
    if not spec_path.is_file():
        raise BundleError(
            f"{spec_path}: not found; point --model-dir or CAE_MODEL_DIR at a bundle "
            "(python -m export onnx CHECKPOINT DIR writes one)"
        )
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{spec_path}: unreadable ({type(e).__name__})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise BundleError(f"{spec_path}: not a {FORMAT} spec")
    if spec.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{spec_path}: format_version {spec.get('format_version')!r}, this server reads {FORMAT_VERSION}"
        )
    _validate_schema(spec)
    try:
        image = _image_spec(spec["image"])
        task_images = {t: _image_spec(e["image"]) for t, e in spec["tasks"].items() if e.get("image")}
        target = spec["target"]
        bundle = Bundle(
            path=path,
            spec=spec,
            model_id=str(spec["model"]["id"]),
            image=image,
            embed_dim=int(spec["embed_dim"]),
            target_type=str(target["type"]),
            pred_dim=int(target["pred_dim"]),
            norm_pix_loss=bool(target.get("norm_pix_loss", False)),
            default_mask_ratio=float(target.get("default_mask_ratio", 0.5)),
            class_names=spec.get("class_names"),
            task_images=task_images,
        )
        tasks = dict(spec["tasks"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise BundleError(f"{spec_path}: missing or malformed field ({type(e).__name__}: {e})") from None
    if not tasks:
        raise BundleError(f"{spec_path}: no tasks")
    for where, spec_ in [("image", image), *((f"tasks.{t}.image", i) for t, i in task_images.items())]:
        if (
            spec_.channels not in (1, 3)
            or len(spec_.mean) != spec_.channels
            or len(spec_.std) != spec_.channels
        ):
            raise BundleError(f"{spec_path}: {where}.channels must be 1 or 3 with one mean/std per channel")
        if spec_.interpolation not in INTERPOLATIONS:
            raise BundleError(
                f"{spec_path}: {where}.interpolation must be one of {', '.join(INTERPOLATIONS)}"
            )
    for t in (t for t in DENSE_TASKS if t in tasks):
        classes = tasks[t].get("classes")
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise BundleError(f"{spec_path}: tasks.{t} needs 'classes' (index = label id, 0 = background)")
    if image.grid[0] * image.grid[1] != image.num_patches or image.grid[0] * image.patch_size != image.size:
        raise BundleError(f"{spec_path}: image grid, patch size and size disagree")
    if spec_only:
        return bundle
    if verify:
        verify_files(path, spec)
    else:
        check_external_data(path, spec)
    return bundle
