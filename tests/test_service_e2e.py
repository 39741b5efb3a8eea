"""End to end: the real server process (``python -m service``, uvicorn, a real port) driven over HTTP,
start-up refusal of a damaged bundle, and proof that serving ONNX never imports torch."""

from __future__ import annotations

import base64
import io
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    CASE_LIMITS,
    REPO,
    TinyBundle,
    error_cases,
    free_port,
    png_bytes,
    run_torchless_driver,
    subprocess_env,
)

KEY = "e2e-secret-key"
AUTH = {"authorization": f"Bearer {KEY}"}
RAW = {"content-type": "image/png", **AUTH}


def _start(bundle: Path, port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--model-dir",
        str(bundle),
        "--port",
        str(port),
        "--backend",
        "onnxruntime",
        "--precision",
        "fp32",
    ]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(**env), stdout=f, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def server(tiny_bundle: TinyBundle, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = tmp_path_factory.mktemp("e2e") / "server.log"
    limits = {f"CAE_{k.upper()}": str(v) for k, v in CASE_LIMITS.items()}
    proc = _start(tiny_bundle.path, port, log, CAE_API_KEYS=KEY, CAE_ACCESS_LOG="false", **limits)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=base, timeout=10) as client:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server not ready in 60 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield client, proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_e2e_probes_models_docs(server, tiny_bundle: TinyBundle) -> None:
    client, _, _ = server
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    assert client.get("/v1/models").status_code == 401
    card = client.get("/v1/models", headers=AUTH).json()["data"][0]
    assert card["id"] == tiny_bundle.spec["model"]["id"] and card["backend"]["name"] == "onnxruntime"
    assert client.get("/docs").status_code == 200 and "/embed" in client.get("/openapi.json").json()["paths"]


def test_e2e_embed_every_input_form_and_output(server) -> None:
    client, _, _ = server
    a, b = png_bytes(seed=1), png_bytes(seed=2)
    assert client.post("/embed", content=a, headers={"content-type": "image/png"}).status_code == 401
    single = client.post("/embed", files={"file": ("a.png", a, "image/png")}, headers=AUTH).json()
    multi = client.post(
        "/embed", files=[("files", ("a.png", a)), ("files", ("b.png", b))], headers=AUTH
    ).json()
    js = client.post(
        "/embed", json={"images": [base64.b64encode(a).decode(), base64.b64encode(b).decode()]}, headers=AUTH
    ).json()
    raw = client.post("/embed", content=a, headers=RAW).json()
    npy = client.post(
        "/embed?pooling=none&normalize=true&dtype=float16",
        content=a,
        headers={**RAW, "accept": "application/x-npy"},
    )
    assert multi["shape"] == [2, 64] and single["shape"] == [1, 64]
    for rows, ref in (
        (single, multi["embeddings"][:1]),
        (js, multi["embeddings"]),
        (raw, multi["embeddings"][:1]),
    ):
        np.testing.assert_allclose(rows["embeddings"], ref, atol=1e-6)
    arr = np.load(io.BytesIO(npy.content))
    assert arr.shape == (1, 16, 64) and arr.dtype == np.float16 and npy.headers["x-patch-grid"] == "4,4"
    np.testing.assert_allclose(np.linalg.norm(arr.astype(np.float32), axis=-1), 1, atol=2e-3)


def test_e2e_reconstruct_png_and_json(server) -> None:
    client, _, _ = server
    img = png_bytes(seed=3)
    png = client.post("/reconstruct?seed=1", content=img, headers=RAW)
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).size == (96, 32)
    one = client.post(
        "/reconstruct?view=reconstruction&masked=0,5", files={"file": ("a.png", img)}, headers=AUTH
    )
    assert Image.open(io.BytesIO(one.content)).size == (32, 32) and one.headers["x-masked-count"] == "2"
    js = client.post(
        "/reconstruct?mask_ratio=0.25&seed=1",
        json={"image": base64.b64encode(img).decode()},
        headers={**AUTH, "accept": "application/json"},
    ).json()
    assert len(js["masked_indices"]) == 4 and set(js["images"]) == {"original", "masked", "reconstruction"}


@pytest.mark.parametrize("case", error_cases(), ids=lambda c: c[0])
def test_e2e_error_paths(server, case) -> None:
    client, _, _ = server
    _, path, kwargs, status, code = case
    kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), **AUTH}}
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_e2e_metrics_and_graceful_shutdown(server) -> None:
    client, proc, log = server
    text = client.get("/metrics").text
    assert 'cae_http_requests_total{method="POST",route="/embed",status="200"}' in text
    assert 'cae_rejections_total{reason="too_many_pixels"}' in text and "cae_batch_size_bucket" in text
    results: list[int] = []

    def call() -> None:
        try:
            results.append(client.post("/embed", content=png_bytes(seed=9), headers=RAW).status_code)
        except httpx.TransportError:
            results.append(-1)  # arrived after the listener closed: refused, never half-served

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(10)
    # a completed graceful shutdown exits 0 (service/__main__.py keeps uvicorn from re-raising the SIGTERM)
    assert proc.wait(15) == 0, log.read_text()
    assert "service: stopped" in log.read_text() and "Application shutdown complete" in log.read_text()
    assert set(results) <= {200, -1} and 200 in results, results
    assert "KEY" not in log.read_text() and KEY not in log.read_text()


def test_e2e_damaged_bundle_refuses_to_start(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, bad)
    with open(bad / "reconstruct.onnx", "ab") as f:
        f.write(b"tampered")
    log = tmp_path / "log"
    proc = _start(bad, free_port(), log)
    assert proc.wait(60) != 0
    assert "refusing to start" in log.read_text() and "reconstruct.onnx: sha256 mismatch" in log.read_text()


def test_serving_onnx_never_imports_torch(tiny_bundle: TinyBundle) -> None:
    out = run_torchless_driver(tiny_bundle.path, ["/embed?pooling=none", "/reconstruct"], timeout=120)
    assert out == {"attempts": [], "torch": False, "training": False, "used": out["used"]}, out
    assert out["used"][0] == "onnxruntime" and set(out["used"][1].split("+")) <= {
        "openvino",
        "onnxruntime",
    }  # auto: per task
