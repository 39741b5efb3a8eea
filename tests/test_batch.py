"""Offline embedding (``python -m service.batch``) on real Fashion-MNIST images: every good file gets a
row, bad files are reported and skipped, a rerun skips finished parts, and the embeddings equal what the
service's ``/embed`` returns for the same bytes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO

FMNIST = Path("/usr/share/datasets/fashion-mnist")
BUNDLE = REPO / "models" / "default"
N_FILES, N_TAR = 200, 16


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 PNGs in class folders, a WebDataset shard of 16 samples, a corrupt PNG, a text file, a hidden
    file."""
    path = FMNIST / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from training.data import read_idx

    images = read_idx(path)[: N_FILES + N_TAR]
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[: N_FILES + N_TAR]
    root = tmp_path_factory.mktemp("batch-src")
    for i in range(N_FILES):
        d = root / f"class{labels[i]}"
        d.mkdir(exist_ok=True)
        (d / f"{i:04d}.png").write_bytes(_png(images[i]))
    (root / "shards").mkdir()
    with tarfile.open(root / "shards" / "s0.tar", "w") as tar:
        for j in range(N_TAR):
            i = N_FILES + j
            for name, data in ((f"{i:06d}.png", _png(images[i])), (f"{i:06d}.cls", str(labels[i]).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "class0" / "corrupt.png").write_bytes(_png(images[0])[:60])  # a truncated PNG
    (root / "notes.txt").write_text("not an image\n")
    (root / ".DS_Store").write_bytes(b"\0" * 10)  # hidden: ignored, not an error
    return root


def test_list_parts_is_deterministic(src: Path) -> None:
    from service.batch import list_parts

    parts = list_parts(src, chunk_size=64)
    assert parts == list_parts(src, chunk_size=64)
    tars = [p for p in parts if p.kind == "tar"]
    files = [f for p in parts if p.kind == "files" for f in p.paths]
    assert [p.paths for p in tars] == [("shards/s0.tar",)]
    assert len(files) == N_FILES + 2 and ".DS_Store" not in files and "notes.txt" in files
    assert len({p.name for p in parts}) == len(parts)
    # a changed listing renames the parts it touches, so stale outputs are never taken as done
    (src / "zzz").mkdir()
    (src / "zzz" / "new.png").write_bytes((src / "class0" / "corrupt.png").read_bytes())
    try:
        before = [p.name for p in parts if p.kind == "files"]
        after = [p.name for p in list_parts(src, chunk_size=64) if p.kind == "files"]
        assert after[:-1] == before[:-1] and after[-1] != before[-1]  # only the last chunk changed
    finally:
        (src / "zzz" / "new.png").unlink()
        (src / "zzz").rmdir()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="ray not installed: pip install 'cae-service[batch]'")
    pytest.importorskip("ray.data", reason="ray[data] not installed: pip install 'cae-service[batch]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _service_embeddings(paths: list[Path]) -> tuple[np.ndarray, str]:
    """The service's /embed (defaults: the bundle's default pooling, not normalized) on ONNX Runtime fp32,
    via TestClient."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model_dir=BUNDLE, backend="onnxruntime", precision="fp32", threads=1))
    with TestClient(app) as client:
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
        r = client.post("/embed", files=files)
        assert r.status_code == 200, r.text
        body = r.json()
    return np.asarray(body["embeddings"], dtype=np.float32), body["model"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_end_to_end(src: Path, tmp_path: Path, local_ray) -> None:
    import pyarrow.parquet as pq

    from service.batch import ERRORS_FILE, main, run

    dst = tmp_path / "out"
    s = run(src, dst, BUNDLE, batch_size=32, num_actors=1, chunk_size=64)
    assert s["incomplete_parts"] == [] and s["skipped_parts"] == 0
    assert s["written_parts"] == s["parts"] == 5  # 202 files in 4 chunks of 64 + 1 shard
    assert s["rows"] == N_FILES + N_TAR and s["errors"] == 2

    table = pq.read_table(dst)  # _errors.jsonl is skipped by the Parquet reader (leading "_")
    assert table.num_rows == N_FILES + N_TAR
    paths = table.column("path").to_pylist()
    expected = {p.relative_to(src).as_posix() for p in src.glob("class*/*.png") if p.name != "corrupt.png"}
    expected |= {f"shards/s0.tar/{N_FILES + j:06d}.png" for j in range(N_TAR)}
    assert set(paths) == expected and len(paths) == len(expected)
    import pyarrow as pa

    etype = table.schema.field("embedding").type
    assert pa.types.is_list(etype) and etype.value_type == pa.float32()
    emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    spec = json.loads((BUNDLE / "spec.json").read_text())
    pooling = spec["tasks"]["embed"].get("default_pooling", "cls")  # what /embed returns by default
    width = 2 * int(pooling[4:]) if pooling.startswith("last") else 2 if pooling == "cls+mean" else 1
    dim = spec["embed_dim"] * width
    assert emb.shape == (N_FILES + N_TAR, dim) and np.isfinite(emb).all() and (np.abs(emb).sum(1) > 0).all()
    ids = dict(zip(paths, table.column("id").to_pylist(), strict=True))
    assert ids[f"shards/s0.tar/{N_FILES:06d}.png"] == f"{N_FILES:06d}"

    errors = [json.loads(line) for line in (dst / ERRORS_FILE).read_text().splitlines()]
    assert {e["path"]: e["code"] for e in errors} == {
        "class0/corrupt.png": "corrupt_image",
        "notes.txt": "unsupported_format",
    }

    # the service's /embed on the same bytes: same model, same numbers
    rng = np.random.default_rng(0)
    folder_rows = [i for i, p in enumerate(paths) if ".tar/" not in p]
    sample = sorted(rng.choice(folder_rows, 20, replace=False).tolist())
    want, model = _service_embeddings([src / paths[i] for i in sample])
    assert set(table.column("model").to_pylist()) == {model}
    np.testing.assert_allclose(emb[sample], want, atol=1e-5, rtol=0)

    # a rerun skips every finished part; a removed part is redone alone (through the CLI)
    assert run(src, dst, BUNDLE, chunk_size=64)["written_parts"] == 0
    victim = sorted(dst.glob("part-*.parquet"))[1]
    before = pq.read_table(victim)
    victim.unlink()
    assert main([str(src), str(dst), "--chunk-size", "64", "--batch-size", "16"]) == 0
    assert pq.read_table(victim).equals(before)
    assert len(list(dst.glob("*.parquet"))) == 5 and not list(dst.glob(".*tmp*"))
