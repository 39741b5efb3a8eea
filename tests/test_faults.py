"""Faults (issue 8): a failing or hanging backend, a damaged bundle, SIGTERM under load, SIGKILL during
training then --resume, and a full disk while a checkpoint is written. Each test checks the failure is
reported clearly and that the service (or the run) recovers.

Already covered elsewhere and not repeated: 500 ``inference_failed`` without internals and the switch to
unhealthy (tests/test_service_batcher.py), 504 on a hang, an altered graph refused by a subprocess
(tests/test_service_e2e.py), exact resume after a clean stop (tests/test_training.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.bundle import BundleError, load_bundle
from tests.helpers import (
    REPO,
    TINY,
    FakeBackend,
    TinyBundle,
    png_bytes,
    serve,
    tiny_cfg,
    train_losses,
)
from training.checkpointing import CKPT_POINTER, find_resume_checkpoint, load_training_checkpoint
from training.pretrain import pretrain

RAW = {"content-type": "image/png"}


def _wait(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------ backend
def test_failing_backend_turns_unhealthy_then_recovers(tiny_bundle: TinyBundle) -> None:
    fake = FakeBackend(fail=True)
    with serve(tiny_bundle.path, instance=fake, unhealthy_retry_s=0.3) as c:
        for _ in range(3):
            r = c.post("/embed", content=png_bytes(), headers=RAW)
            assert r.status_code == 500 and r.json()["error"]["message"] == "embed inference failed"
        r = c.post("/embed", content=png_bytes(), headers=RAW)  # unhealthy: refused without trying
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"]
        ready = c.get("/readyz").json()
        assert ready["status"] == "unhealthy" and "3 consecutive inference failures" in ready["detail"]
        fake.fail = False  # the cause goes away (a driver reset, a freed disk, ...)
        time.sleep(0.35)  # one trial request is let through per unhealthy_retry_s
        r = c.post("/embed", content=png_bytes(), headers=RAW)
        assert r.status_code == 200, r.text
        assert c.get("/readyz").status_code == 200
        assert all(
            c.post("/embed", content=png_bytes(seed=i), headers=RAW).status_code == 200 for i in range(3)
        )


def test_still_failing_backend_is_tried_only_once_per_interval(tiny_bundle: TinyBundle) -> None:
    fake = FakeBackend(fail=True)
    with serve(tiny_bundle.path, instance=fake, unhealthy_retry_s=60) as c:
        codes = [c.post("/embed", content=png_bytes(), headers=RAW).status_code for _ in range(8)]
        assert codes == [500, 500, 500] + [503] * 5  # no retry storm against a broken backend
        assert len(fake.calls) == 3


def test_hung_backend_gives_504_marks_not_ready_and_recovers(tiny_bundle: TinyBundle) -> None:
    fake = FakeBackend()
    with serve(tiny_bundle.path, instance=fake, request_timeout_s=0.3, shutdown_timeout_s=1) as c:
        fake.hang = True
        r = c.post("/embed", content=png_bytes(), headers=RAW)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        # the call is still stuck in the backend: readiness says so (a balancer should route away)
        _wait(lambda: c.get("/readyz").status_code == 503, what="readiness to report the hang")
        ready = c.get("/readyz")
        assert ready.json()["status"] == "unhealthy" and "embed inference running" in ready.json()["detail"]
        assert c.get("/healthz").status_code == 200
        fake.hang = False
        fake.release.set()
        _wait(lambda: c.get("/readyz").status_code == 200, what="ready again")
        assert c.post("/embed", content=png_bytes(), headers=RAW).status_code == 200


# ------------------------------------------------------------------------------------------- bundle
def _copy(tiny: TinyBundle, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny.path, out)
    return out


def _refusal(bundle: Path) -> str:
    """The app's start-up error for ``bundle`` (the lifespan raises it; uvicorn then exits 3)."""
    from service.runtime import StartupError

    with pytest.raises(StartupError) as e, serve(bundle):
        pass
    return str(e.value)


def test_bundle_with_a_missing_file_refuses_to_start(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    bad = _copy(tiny_bundle, tmp_path)
    (bad / "embed.onnx").unlink()
    msg = _refusal(bad)
    assert msg.startswith("refusing to start:") and "embed.onnx: missing" in msg


def test_bundle_with_an_altered_file_refuses_to_start(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    bad = _copy(tiny_bundle, tmp_path)
    data = bytearray((bad / "embed.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the size is unchanged, only the checksum can tell
    (bad / "embed.int8.onnx").write_bytes(bytes(data))
    msg = _refusal(bad)
    assert "embed.int8.onnx: sha256 mismatch" in msg and "altered or corrupted" in msg


def test_bundle_spec_tampering_is_refused(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    bad = _copy(tiny_bundle, tmp_path)
    spec = json.loads((bad / "spec.json").read_text())
    spec["files"].pop("reconstruct.onnx")  # a graph nobody vouches for
    (bad / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match=r"references \['reconstruct.onnx'\] without a sha256"):
        load_bundle(bad)
    spec["files"]["reconstruct.onnx"] = "0" * 64
    spec["files"]["../escape.onnx"] = "0" * 64
    (bad / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match="invalid file name"):
        load_bundle(bad)
    (bad / "spec.json").write_text("{not json")
    assert "spec.json: unreadable" in _refusal(bad)


# -------------------------------------------------------------------------------------------- SIGTERM
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_sigterm_under_load_finishes_in_flight_requests_and_exits_0(
    tiny_bundle: TinyBundle, tmp_path: Path
) -> None:
    port = _free_port()
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAE_")}
    # one decode worker and 600x600 PNGs (~20 ms each to decode): requests queue, so some are in flight
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CAE_DECODE_WORKERS="1", CAE_ACCESS_LOG="false")
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--model-dir",
        str(tiny_bundle.path),
        "--port",
        str(port),
        "--backend",
        "onnxruntime",
    ]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _ready(base), timeout=60, what="server ready")
        body = png_bytes(600, 600)
        results: list[tuple[float, float, Any]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=base, timeout=30) as h:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        r = h.post("/embed", content=body, headers=RAW)
                        out: Any = (r.status_code, r.json().get("error", {}).get("code"))
                    except httpx.TransportError as e:
                        out = type(e).__name__
                    with lock:
                        results.append((t0, time.monotonic(), out))
                    if isinstance(out, str):
                        return  # the server is gone or going: stop this client

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        _wait(lambda: len(results) >= 16, timeout=30, what="load")
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        stop.set()
        for t in threads:
            t.join(30)
        answered = [out for _, _, out in results if not isinstance(out, str)]
        assert set(answered) <= {(200, None), (503, "shutting_down")}, answered
        # requests sent before the signal and answered after it: drained, not dropped
        drained = [out for t0, t1, out in results if t0 < t_term < t1 and out == (200, None)]
        assert drained, results[-20:]
        refused = [out for _, _, out in results if isinstance(out, str)]
        assert set(refused) <= {"ConnectError", "RemoteProtocolError", "ReadError"}, refused
        with pytest.raises(httpx.ConnectError):  # new connections are refused once it has exited
            httpx.get(base + "/healthz", timeout=2)
        text = log.read_text()
        assert "service: stopped" in text and "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


# ------------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_sigkill_during_training_then_resume(tmp_path: Path, image_folder: Path) -> None:
    run = tmp_path / "run"
    epochs = 24
    sets = [
        *TINY,
        f"data.dataset=imagefolder:{image_folder}",
        f"optim.epochs={epochs}",
        "runtime.recon_every_epochs=100",
    ]
    cmd = [sys.executable, "training/run.py", "pretrain", "--config", "fmnist_cae", "--output-dir", str(run)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "train.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)

    def pointer_epoch() -> int:
        try:
            return int(json.loads((run / CKPT_POINTER).read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            return -1

    try:
        _wait(lambda: pointer_epoch() >= 2 or proc.poll() is not None, timeout=240, what="a checkpoint")
        assert proc.poll() is None, (
            "training finished before it could be killed; raise epochs\n" + log.read_text()[-2000:]
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = find_resume_checkpoint(run)
    assert ckpt is not None
    state = load_training_checkpoint(ckpt)  # the newest checkpoint is whole, whatever the kill interrupted
    killed_at = int(state["global_step"])
    before = train_losses(run)
    assert killed_at >= 3 * 3 and not (run / "model.safetensors").exists()

    r = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt.name}" in r.stderr + r.stdout
    after = train_losses(run)
    assert sorted(after) == list(range(1, epochs * 3 + 1))  # every step once: none lost, none twice
    for s in range(1, killed_at + 1):
        assert after[s] == before[s]  # steps up to the checkpoint are kept as they were
    first, last = (
        sum(after[s] for s in (1, 2, 3)) / 3,
        sum(after[s] for s in range(epochs * 3 - 2, epochs * 3 + 1)) / 3,
    )
    assert last < first  # the loss continues downwards from the resumed state
    assert (run / "model.safetensors").exists() and not list(run.glob("*.tmp"))


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    pretrain(tiny_cfg(image_folder, "optim.epochs=1"), run)
    good = find_resume_checkpoint(run)
    assert good is not None
    pointer = (run / CKPT_POINTER).read_text()
    real_save = torch.save

    def full_disk(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        f.write(b"PK\x03\x04 partial checkpoint bytes")  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        pretrain(tiny_cfg(image_folder, "optim.epochs=2"), run, resume=True)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real_save)
    assert (run / CKPT_POINTER).read_text() == pointer and find_resume_checkpoint(run) == good
    assert load_training_checkpoint(good)["epoch"] == 0  # intact and loadable
    assert not list(run.glob("*.tmp")), list(run.iterdir())  # the partial file does not linger
    pretrain(tiny_cfg(image_folder, "optim.epochs=2"), run, resume=True)  # space is back: it continues
    assert sorted(train_losses(run)) == list(range(1, 7))
