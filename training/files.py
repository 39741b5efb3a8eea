"""Atomic file writes (temp file beside the target, then rename) and sha256 checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_path",
    "atomic_torch_save",
    "atomic_write",
    "cached_sha256_file",
    "file_mode",
    "save_npy_atomic",
    "save_safetensors_atomic",
    "sha256_file",
    "write_json_atomic",
    "write_text_atomic",
]


@contextlib.contextmanager
def atomic_path(path: Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``, on any failure
    it is removed (e.g. ENOSPC mid-write: a partial file would hold the space the next try needs) and
    ``path`` is left as it was. The name carries the pid, so that processes writing the same target
    (a shared feature cache) do not mix their bytes, and ends in ``.tmp``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:  # so that a crash after the rename cannot leave an empty file
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(
    path: Path, write: Callable[[IO[Any]], None], *, text: bool = False, fsync: bool = True
) -> None:
    """Write ``path`` atomically through ``write(file)`` (see :func:`atomic_path`)."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "w" if text else "wb") as f:
        write(f)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 under the usual 022)."""
    current = os.umask(0)
    os.umask(current)
    return 0o666 & ~current


def save_safetensors_atomic(
    tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None, *, fsync: bool = False
) -> None:
    """``safetensors.torch.save_file`` through :func:`atomic_path`, with the umask's mode: safetensors
    alone writes 0600, and a model file should be as readable as its neighbours."""
    from safetensors.torch import save_file

    with atomic_path(path, fsync=fsync) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, file_mode())


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent)), text=True)


def write_text_atomic(path: Path, text: str, *, fsync: bool = True) -> None:
    atomic_write(path, lambda f: f.write(text), text=True, fsync=fsync)


def save_npy_atomic(path: Path, arr: Any) -> None:
    """A ``.npy`` array (feature-cache entries: no fsync, the cache can be rebuilt)."""
    import numpy as np

    atomic_write(path, lambda f: np.save(f, arr), fsync=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (training's one checksum; the bundle side has ``service.bundle_format``'s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def cached_sha256_file(path: Path) -> str:
    """:func:`sha256_file`, remembered per (path, size, mtime) for the life of the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]
