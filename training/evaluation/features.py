"""Frozen features: the evaluation datasets, their extraction and the on-disk feature cache.

One encoder pass per batch gives every readout (and optionally the token grid); cache entries are keyed by
weights, data, split, preprocessing, precision and subset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .. import data as D
from ..files import atomic_path, save_npy_atomic, write_text_atomic
from ..models import CAE, parse_readout
from ..runtime import autocast
from ..tracking import Progress
from .backbone import Backbone, PixelFeatures
from .params import CommonParams, EvalError

__all__ = [
    "CACHE_VERSION",
    "DEFAULT_CACHE_DIR",
    "DataSpec",
    "Split",
    "count_classes",
    "token_blocks",
    "extract_features",
    "get_features",
    "parse_dataset",
    "subset_indices",
]

_logger = logging.getLogger("training.evaluation")

DEFAULT_CACHE_DIR = Path("~/.cache/cae-service/features")
CACHE_VERSION = 2


@dataclass
class DataSpec:
    dataset: str
    kind: str  # fashion-mnist | imagefolder
    root: Path | None

    @property
    def default_crop_pct(self) -> float:
        return 1.0 if self.kind == "fashion-mnist" else 0.875

    def source(self, split: str) -> Dataset:
        try:
            return D.build_source(self.dataset, split)
        except (D.DataError, OSError) as e:
            raise EvalError(f"dataset {self.dataset!r} ({split}): {e}") from e


def parse_dataset(dataset: str) -> DataSpec:
    kind, _, arg = dataset.partition(":")
    if kind in ("fashion-mnist", "fashion-mnist-shifted", "fashion-mnist-val"):
        return DataSpec(dataset, "fashion-mnist", Path(arg).resolve() if arg else D.FMNIST_DIR)
    if kind == "imagefolder":
        if not arg:
            raise EvalError("imagefolder needs a path: imagefolder:PATH (with PATH/train and PATH/val)")
        root = Path(arg).expanduser().resolve()
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise EvalError(f"dataset {dataset!r}: missing {', '.join(str(root / s) for s in missing)}")
        return DataSpec(f"imagefolder:{root}", kind, root)
    raise EvalError(
        f"unknown dataset {dataset!r}; use fashion-mnist[:ROOT], fashion-mnist-shifted[:ROOT] (test garments "
        "smaller and off-centre), fashion-mnist-val[:ROOT] (the train split's last 10k held out) or "
        "imagefolder:PATH"
    )


def _source_fingerprint(spec: DataSpec, source: Dataset) -> str:
    """What identifies a split's content for the cache (file list for image folders)."""
    if spec.kind == "imagefolder":
        h = hashlib.sha256()
        for p, label in source.samples:  # type: ignore[attr-defined]
            h.update(f"{Path(p).relative_to(spec.root)}\t{label}\n".encode())
        return h.hexdigest()[:16]
    shifted = f":shifted{D.ShiftedDataset.SCALE}" if isinstance(source, D.ShiftedDataset) else ""
    return f"{spec.root}:{len(source)}{shifted}"  # type: ignore[arg-type]


def subset_indices(n: int, limit: int | None) -> np.ndarray | None:
    """A fixed random subset (seed 0, sorted): class-balanced for sorted image folders, cache-friendly."""
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(0).permutation(n)[:limit])


def count_classes(*sources: Dataset, labels: Sequence[np.ndarray] = ()) -> int:
    names = [getattr(s, "classes", None) for s in sources]
    known = [len(c) for c in names if c]
    if len({tuple(c) for c in names if c}) > 1:
        raise EvalError(f"train and test splits have different classes: {[list(c)[:5] for c in names if c]}")
    from_labels = [int(lab.max()) + 1 for lab in labels if len(lab)]
    return max(known + from_labels + [1])


def token_blocks(tokens: str, depth: int) -> int:
    """The attentive probe's token source -> blocks to concatenate: ``final`` (the final-norm tokens,
    official) -> 0; ``lastN`` (each of the last N blocks' tokens through the final norm) -> N."""
    if tokens == "final":
        return 0
    if tokens.startswith("last"):
        try:
            return parse_readout(tokens, depth)[1]
        except ValueError:
            pass
    raise EvalError(f"tokens must be final or lastN with 1 <= N <= {depth} (e.g. last4), got {tokens!r}")


def _feature_file(readout: str) -> str:
    return "feat-" + readout.replace("+", "_") + ".npy"


@torch.no_grad()
def extract_features(
    model: CAE | PixelFeatures,
    dataset: Dataset,
    *,
    tokens: bool = False,
    token_blocks: int = 0,
    readouts: Sequence[str] = (),
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    tokens_path: Path | None = None,
    what: str = "extract",
) -> dict[str, np.ndarray]:
    """Frozen features of a ``(tensor, label)`` dataset, in order, from one encoder pass per batch.

    Returns ``cls`` [N, D] float32 (cls token after the final norm, the linear-probe feature), ``labels``
    [N] int64, each readout of ``readouts`` (:meth:`CAE.forward_readouts`) [N, F] float32 and, with
    ``tokens=True``, ``tokens`` [N, 1+Np, D] float16 (every output token after the final norm, written
    into a memory map at ``tokens_path`` when given; with ``token_blocks=n``, [N, 1+Np, n*D]: the tokens
    of each of the last n blocks through the final norm, concatenated on channels). For
    :class:`PixelFeatures`, ``cls`` holds the pixels.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    n = len(dataset)  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    arrays: dict[str, np.ndarray] = {}
    labels = np.empty((n,), dtype=np.int64)
    grid: np.ndarray | None = None
    extra = [r for r in dict.fromkeys(readouts) if r != "cls"]
    progress = Progress(what, n, logger=_logger)
    i = 0
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if isinstance(model, PixelFeatures):
            feats, outs = None, {"cls": model(images)}
        else:
            with autocast(device, amp_dtype):
                feats, outs = model.forward_readouts(images, ["cls", *extra], token_blocks=token_blocks)
            feats = feats.float()
        b = images.shape[0]
        for name, v in outs.items():
            if name not in arrays:
                arrays[name] = np.empty((n, v.shape[-1]), dtype=np.float32)
            arrays[name][i : i + b] = v.float().cpu().numpy()
        if tokens and feats is not None:
            if grid is None:
                shape = (n, feats.shape[1], feats.shape[2])
                grid = (
                    np.lib.format.open_memmap(tokens_path, mode="w+", dtype=np.float16, shape=shape)
                    if tokens_path is not None
                    else np.empty(shape, dtype=np.float16)
                )
            grid[i : i + b] = feats.to(torch.float16).cpu().numpy()
        labels[i : i + b] = np.asarray(y, dtype=np.int64)
        i += b
        progress.update(i)
    out = {**arrays, "labels": labels}
    if grid is not None:
        if isinstance(grid, np.memmap):
            grid.flush()
        out["tokens"] = grid
    return out


@dataclass
class Split:
    features: dict[str, np.ndarray]  # cls, labels and maybe tokens
    num_classes: int
    cached: bool
    classes: list[str]


def get_features(
    backbone: Backbone,
    spec: DataSpec,
    split: str,
    tokens: str | None,
    readouts: Sequence[str],
    params: CommonParams,
    transform: D.EvalTransform,
    preprocess: dict[str, Any],
    amp: torch.dtype | None,
    device: torch.device,
    cache_dir: Path,
) -> Split:
    source = spec.source(split)
    limit = params.limit_train if split == "train" else params.limit_test
    key_fields = {
        "version": CACHE_VERSION,
        "model": backbone.identity,
        # the shifted set only changes the test split: its train features are the plain set's
        "dataset": spec.dataset.replace("fashion-mnist-shifted", "fashion-mnist")
        if split == "train"
        else spec.dataset,
        "content": _source_fingerprint(spec, source),
        "split": split,
        "preprocess": {k: preprocess[k] for k in ("img_size", "mean", "std", "interpolation", "crop_pct")},
        "precision": "bf16" if amp is not None and backbone.identity != "pixels" else "fp32",
        "limit": limit,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    entry = cache_dir / key
    readouts = [r for r in dict.fromkeys(readouts) if r != "cls"]
    need_tokens = tokens is not None
    kinds = ["cls", "labels"] + (["tokens"] if need_tokens else []) + readouts
    files = {k: entry / (_feature_file(k) if k in readouts else f"{k}.npy") for k in kinds}
    if tokens is not None and tokens != "final":
        files["tokens"] = entry / f"tokens-{tokens}.npy"
    meta_path = entry / "meta.json"  # written last: its presence marks a complete entry
    if meta_path.exists() and all(p.exists() for p in files.values()):
        _logger.info("%s features (%s): cached in %s", split, "+".join(kinds[:1] + kinds[2:]), entry)
        feats = {k: np.load(p, mmap_mode="r" if k == "tokens" else None) for k, p in files.items()}
        meta = json.loads(meta_path.read_text())
        return Split(feats, int(meta["num_classes"]), cached=True, classes=list(meta.get("classes") or []))

    idx = subset_indices(len(source), limit)  # type: ignore[arg-type]
    classes = getattr(source, "classes", None)
    ds: Dataset = D.TransformedDataset(source, transform)
    if idx is not None:
        ds = Subset(ds, idx.tolist())
    entry.mkdir(parents=True, exist_ok=True)
    kind_name = "+".join(["cls"] + ([f"tokens({tokens})"] if need_tokens else []) + readouts)
    _logger.info("extracting %s %s features of %d images with %s", split, kind_name, len(ds), backbone.spec)
    with (
        contextlib.ExitStack() as stack
    ):  # the token grid goes straight into a memory map, renamed when complete
        tmp_tokens = stack.enter_context(atomic_path(files["tokens"], fsync=False)) if need_tokens else None
        feats = extract_features(
            backbone.model(),
            ds,
            tokens=need_tokens,
            token_blocks=token_blocks(tokens, backbone.cfg.depth) if tokens is not None else 0,
            readouts=readouts,
            batch_size=params.extract_batch_size,
            num_workers=params.num_workers,
            device=device,
            amp_dtype=amp,
            tokens_path=tmp_tokens,
            what=f"extract {split} {kind_name}",
        )
        if tmp_tokens is not None:
            del feats["tokens"]  # close the memory map before renaming it
    if need_tokens:
        feats["tokens"] = np.load(files["tokens"], mmap_mode="r")
    save_npy_atomic(entry / "labels.npy", feats["labels"])
    save_npy_atomic(entry / "cls.npy", feats["cls"])
    for r in readouts:
        save_npy_atomic(files[r], feats[r])
    nc = count_classes(source, labels=[feats["labels"]])
    meta = {
        **key_fields,
        "checkpoint": backbone.spec,
        "n": len(ds),
        "num_classes": nc,
        "classes": list(classes or []),
    }
    write_text_atomic(meta_path, json.dumps(meta, indent=1), fsync=False)
    return Split(feats, nc, cached=False, classes=list(classes or []))
