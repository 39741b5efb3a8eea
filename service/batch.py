"""Offline embedding with Ray Data: ``python -m service.batch SRC DST [--bundle DIR] [--batch-size N]
[--num-actors N]``.

SRC is a folder (read recursively; ``.tar`` files inside it are read as WebDataset shards), one ``.tar``
shard, or a glob of shards. Images are decoded and preprocessed by the service's own
:class:`service.imaging.Preprocessor` (same limits, same error codes), embedded by the service's ONNX
Runtime backend in a pool of actors, and pooled like ``POST /embed`` by default (the cls token after
the final norm, not normalized).

Output, DST/:
  ``<part>.parquet``   columns ``path`` (relative to SRC; ``shard.tar/member`` for shards), ``id`` (the
                       relative path, or the WebDataset key), ``embedding`` (list<float32>), ``model``
  ``_errors.jsonl``    one line per file that was not embedded: part, path, code, error
Work is cut into parts: one per shard, and the sorted file list of a folder cut every ``--chunk-size``
files (a part's name carries a hash of its file list, so a changed listing never reuses a stale part).
Each part's Parquet file is written atomically once all its rows are in, so a rerun skips every part
already written and an interrupted run loses at most the parts in flight.

Local by default (``ray.init()``); with ``RAY_ADDRESS`` set it joins that cluster (``address="auto"``)
unchanged. On a cluster, SRC, DST and the bundle must be on storage every node mounts at the same path,
and the nodes need ``pip install 'cae-service[batch]'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, ImageSpec, load_bundle
from .errors import ServiceError
from .imaging import Limits, Preprocessor, configure_pillow
from .postprocess import l2_normalize, pool
from .settings import DEFAULT_MODEL_DIR

_logger = logging.getLogger("service.batch")

ERRORS_FILE = "_errors.jsonl"  # "_" prefix: Parquet readers of DST skip it
# WebDataset members that hold an image; other members of a sample (.cls, .json, ...) are ignored
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})


@dataclasses.dataclass(frozen=True)
class Part:
    """A unit of work and of output: one Parquet file."""

    name: str
    kind: str  # "files" | "tar"
    root: str  # paths in the output are relative to this
    paths: tuple[str, ...]  # the files (kind "files") or the one shard (kind "tar")


def _digest(items: list[str] | tuple[str, ...]) -> str:
    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:10]


def list_parts(src: str | Path, chunk_size: int = 1000) -> list[Part]:
    """The parts of SRC, in a deterministic order (the same listing gives the same part names)."""
    src_s = str(src)
    if any(c in src_s for c in "*?["):
        shards = sorted(glob.glob(src_s, recursive=True))
        if not shards:
            raise FileNotFoundError(f"{src}: no file matches")
        root = os.path.commonpath([os.path.dirname(s) for s in shards])
        return [_tar_part(Path(s), Path(root)) for s in shards]
    path = Path(src)
    if path.is_file():
        return [_tar_part(path, path.parent)]
    if not path.is_dir():
        raise FileNotFoundError(f"{src}: not a folder, a .tar shard or a glob of shards")
    files: list[str] = []
    parts: list[Part] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            p = Path(dirpath) / f
            if f.endswith(".tar"):
                parts.append(_tar_part(p, path))
            else:
                files.append(p.relative_to(path).as_posix())
    files.sort()
    for i in range(0, len(files), chunk_size):
        chunk = tuple(files[i : i + chunk_size])
        parts.append(Part(f"part-{i // chunk_size:06d}-{_digest(chunk)}", "files", str(path), chunk))
    return parts


def _tar_part(shard: Path, root: Path) -> Part:
    rel = shard.relative_to(root).as_posix() if shard.is_relative_to(root) else shard.name
    return Part(f"shard-{shard.stem}-{_digest([rel])}", "tar", str(root), (rel,))


# ------------------------------------------------------------------------------------ pipeline stages
def _row(
    part: str, total: int, path: str, id_: str, data: bytes, code: str = "", error: str = ""
) -> dict[str, Any]:
    return {"part": part, "total": total, "path": path, "id": id_, "data": data, "code": code, "error": error}


def read_part(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One part -> one row per image (bytes not decoded yet), each carrying the part's row count so the
    driver knows when the part is complete. Unreadable files become error rows, never exceptions."""
    part = Part(**{**item, "paths": tuple(item["paths"])})
    root = Path(part.root)
    if part.kind == "files":
        for rel in part.paths:
            try:
                data = (root / rel).read_bytes()
            except OSError as e:
                yield _row(part.name, len(part.paths), rel, rel, b"", "unreadable", f"{rel}: {e.strerror}")
                continue
            yield _row(part.name, len(part.paths), rel, rel, data)
        return
    (rel,) = part.paths
    try:
        with tarfile.open(root / rel) as tar:
            # headers first: the row count must be known before any row leaves
            members = [m for m in tar.getmembers() if m.isfile() and _ext(m.name) in IMAGE_EXTS]
            if not members:
                yield _row(part.name, 1, rel, rel, b"", "empty_shard", f"{rel}: no image members")
                return
            for m in members:
                path, key = (
                    f"{rel}/{m.name}",
                    m.name.split(".", 1)[0],
                )  # the WebDataset key: up to the 1st dot
                try:
                    f = tar.extractfile(m)
                    data = f.read() if f is not None else b""
                except (OSError, tarfile.TarError, EOFError) as e:
                    yield _row(part.name, len(members), path, key, b"", "unreadable", f"{path}: {e}")
                    continue
                yield _row(part.name, len(members), path, key, data)
    except (OSError, tarfile.TarError, EOFError) as e:
        yield _row(part.name, 1, rel, rel, b"", "bad_shard", f"{rel}: not a readable tar ({e})")


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""


def decode_batch(batch: dict[str, np.ndarray], image: ImageSpec, limits: Limits) -> dict[str, np.ndarray]:
    """Bytes -> the service's normalized float32 [C, S, S]; failures become error rows (zeros)."""
    configure_pillow(limits.max_pixels)  # per worker process, as the service does at start-up
    pre = Preprocessor(image, limits)
    n = len(batch["path"])
    out = np.zeros((n, image.channels, image.size, image.size), dtype=np.float32)
    codes, errors = list(batch["code"]), list(batch["error"])
    for i in range(n):
        if errors[i]:
            continue
        try:
            out[i] = pre(bytes(batch["data"][i]), label=str(batch["path"][i]))
        except ServiceError as e:
            codes[i], errors[i] = e.code, e.message
        except Exception as e:  # never fatal: any other failure is reported with the file
            codes[i], errors[i] = "decode_failed", f"{batch['path'][i]}: {type(e).__name__}: {e}"
    keep = {k: v for k, v in batch.items() if k not in ("data", "code", "error")}
    return {
        **keep,
        "image": out,
        "code": np.array(codes, dtype=object),
        "error": np.array(errors, dtype=object),
    }


class Embedder:
    """A Ray actor holding one ONNX Runtime session of the bundle's embed graph (the service's backend)."""

    def __init__(
        self, bundle_dir: str, precision: str, device: str, threads: int, batch_size: int, pooling: str,
        normalize: bool,
    ) -> None:  # fmt: skip
        from .backends.base import BackendOptions
        from .backends.onnxruntime import OnnxRuntimeBackend

        self.bundle = _embed_only(load_bundle(bundle_dir))
        self.backend = OnnxRuntimeBackend(
            BackendOptions(device=device, threads=threads, max_batch_size=batch_size)
        )
        self.backend.load(self.bundle, precision)
        self.batch_size, self.pooling, self.normalize = batch_size, pooling, normalize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        emb: np.ndarray | None = None
        idx = np.flatnonzero(ok)
        for s in range(0, len(idx), self.batch_size):
            rows = idx[s : s + self.batch_size]
            if self.pooling.startswith("last"):  # needs the graph's second output
                outs = self.backend.infer_outputs("embed", {"images": images[rows]})
                out = pool(outs["tokens"], self.pooling, outs.get("block_readouts"))
            else:
                out = pool(self.backend.infer("embed", {"images": images[rows]}), self.pooling)
            if self.normalize:
                out = l2_normalize(out)
            if emb is None:
                emb = np.zeros((len(images), *out.shape[1:]), dtype=np.float32)
            emb[rows] = out
        if emb is None:  # no decodable image in this batch
            emb = np.zeros((len(images), self.bundle.embed_dim), dtype=np.float32)
        return {**batch, "embedding": emb}


def _embed_only(bundle: Bundle) -> Bundle:
    """The bundle with its embed task only: the other graphs are not loaded (memory, start-up time)."""
    spec = {**bundle.spec, "tasks": {"embed": bundle.spec["tasks"]["embed"]}}
    return dataclasses.replace(bundle, spec=spec)


# -------------------------------------------------------------------------------------------- output
def write_part(dst: Path, name: str, rows: list[dict[str, Any]], model_id: str, pooling: str) -> int:
    """The part's good rows as ``DST/<name>.parquet`` (atomic: temp file + rename); returns their count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = sorted((r for r in rows if not r["error"]), key=lambda r: r["path"])
    dim = len(good[0]["embedding"]) if good else 0
    values = (
        np.concatenate([r["embedding"] for r in good]).astype(np.float32) if good else np.zeros(0, np.float32)
    )
    offsets = np.arange(0, len(good) * dim + 1, max(dim, 1), dtype=np.int32)[: len(good) + 1]
    table = pa.table(
        {
            "path": pa.array([r["path"] for r in good], pa.string()),
            "id": pa.array([r["id"] for r in good], pa.string()),
            "embedding": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32())),
            "model": pa.array([model_id] * len(good), pa.string()),
        }
    ).replace_schema_metadata({"cae.model": model_id, "cae.pooling": pooling})
    tmp = dst / f".{name}.parquet.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, dst / f"{name}.parquet")
    return len(good)


def _append_errors(dst: Path, rows: list[dict[str, Any]]) -> int:
    bad = [r for r in rows if r["error"]]
    if bad:
        with open(dst / ERRORS_FILE, "a") as f:
            for r in sorted(bad, key=lambda r: r["path"]):
                f.write(
                    json.dumps({"part": r["part"], "path": r["path"], "code": r["code"], "error": r["error"]})
                    + "\n"
                )
    return len(bad)


# ---------------------------------------------------------------------------------------------- driver
def init_ray(**kwargs: Any) -> None:
    """Local Ray, or the cluster RAY_ADDRESS names; a no-op when the caller has already connected."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", **kwargs)
    else:
        ray.init(**kwargs)


def run(
    src: str | Path,
    dst: str | Path,
    bundle: str | Path = DEFAULT_MODEL_DIR,
    batch_size: int = 64,
    num_actors: int = 1,
    chunk_size: int = 1000,
    precision: str = "fp32",
    device: str = "cpu",
    threads: int = 1,
    pooling: str | None = None,
    normalize: bool = False,
) -> dict[str, Any]:
    """Embed every image under SRC into DST (see the module docstring); returns counts."""
    import ray.data

    from .settings import Settings

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    b = load_bundle(bundle)  # verified once here; fails fast on a damaged bundle before any work starts
    if "embed" not in b.spec["tasks"]:
        raise SystemExit(f"{bundle}: the bundle has no embed graph")
    pooling = pooling or b.default_pooling  # as /embed without ?pooling=
    if pooling not in b.poolings or pooling == "none":
        raise SystemExit(
            f"--pooling {pooling}: this bundle offers {', '.join(p for p in b.poolings if p != 'none')}"
        )
    settings = Settings()  # the service's limits, CAE_MAX_PIXELS / CAE_MIN_SIDE included
    limits = Limits(settings.max_pixels, settings.min_side)

    parts = list_parts(src, chunk_size)
    todo = [p for p in parts if not (dst / f"{p.name}.parquet").exists()]
    summary: dict[str, Any] = {
        "parts": len(parts), "skipped_parts": len(parts) - len(todo), "written_parts": 0, "rows": 0,
        "errors": 0, "model": b.model_id,
    }  # fmt: skip
    _logger.info(
        "%d parts in %s, %d already in %s, %d to do", len(parts), src, len(parts) - len(todo), dst, len(todo)
    )
    if not todo:
        return summary

    ds: Any = ray.data.from_items([dataclasses.asdict(p) for p in todo], override_num_blocks=len(todo))
    ds = ds.flat_map(read_part)
    ds = ds.map_batches(decode_batch, batch_size=batch_size, fn_kwargs={"image": b.image, "limits": limits})
    ds = ds.map_batches(
        Embedder,
        batch_size=batch_size,
        concurrency=num_actors,
        num_cpus=threads,
        num_gpus=1 if device == "cuda" else 0,
        fn_constructor_kwargs={
            "bundle_dir": str(Path(bundle).resolve()),
            "precision": precision,
            "device": device,
            "threads": threads,
            "batch_size": batch_size,
            "pooling": pooling,
            "normalize": normalize,
        },  # fmt: skip
    )
    # the driver gathers rows per part and writes a part as soon as its last row arrives
    pending: dict[str, list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["path"])):
            row = {k: batch[k][i] for k in ("part", "total", "path", "id", "code", "error", "embedding")}
            rows = pending.setdefault(str(row["part"]), [])
            rows.append(row)
            if len(rows) == int(row["total"]):
                name = str(row["part"])
                n = write_part(dst, name, pending.pop(name), b.model_id, pooling)
                e = _append_errors(dst, rows)
                summary["written_parts"] += 1
                summary["rows"] += n
                summary["errors"] += e
                _logger.info(
                    "%s: %d embedded, %d errors (%d/%d parts, %.1f img/s)",
                    name,
                    n,
                    e,
                    summary["written_parts"],
                    len(todo),
                    (summary["rows"] + summary["errors"]) / (time.perf_counter() - t0),
                )
    if pending:  # cannot happen unless a stage dropped rows: say so rather than write a partial part
        _logger.error("incomplete parts (not written, a rerun retries them): %s", sorted(pending))
    summary["incomplete_parts"] = sorted(pending)
    if summary["errors"]:
        _logger.warning("%d files not embedded: see %s", summary["errors"], dst / ERRORS_FILE)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.batch", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "src", help="image folder (recursive; .tar files in it are WebDataset shards), a .tar, or a glob"
    )
    p.add_argument("dst", help="output folder: one Parquet file per part, _errors.jsonl")
    p.add_argument("--bundle", default=str(DEFAULT_MODEL_DIR), help="model bundle (default: models/default)")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference call")
    p.add_argument("--num-actors", type=int, default=1, help="inference actors (each holds one session)")
    p.add_argument("--chunk-size", type=int, default=1000, help="files of a folder per output part")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per actor")
    p.add_argument("--threads", type=int, default=1, help="CPUs (intra-op threads) per actor")
    p.add_argument(
        "--pooling",
        default=None,
        help="cls | mean | cls+mean | lastN, as /embed?pooling= (default: the bundle's default_pooling)",
    )
    p.add_argument("--normalize", action="store_true", help="L2-normalize, as /embed?normalize=true")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    init_ray()
    summary = run(
        args.src, args.dst, args.bundle, args.batch_size, args.num_actors, args.chunk_size, args.precision,
        args.device, args.threads, args.pooling, args.normalize,
    )  # fmt: skip
    _logger.info("done: %s", json.dumps(summary))
    return 1 if summary.get("incomplete_parts") else 0


if __name__ == "__main__":
    raise SystemExit(main())
