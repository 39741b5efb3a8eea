"""Multi-process mode (``--workers N``): N server processes on one port (SO_REUSEPORT), each with the
runtimes its parent selected once (``task_backends``), its own batchers and a share of the threads;
SIGTERM drains them all and the parent exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from service.backends.select import format_task_backends, parse_task_backends, select_backend
from service.bundle import load_bundle
from tests.helpers import REPO, TinyBundle, free_port, png_bytes, subprocess_env

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_task_backends_round_trip(tiny_bundle: TinyBundle) -> None:
    bundle = load_bundle(tiny_bundle.path)
    sel = select_backend(bundle, "onnxruntime", "fp32")
    text = format_task_backends(sel.backend)
    assert parse_task_backends(text) == {
        "embed": ("onnxruntime", "fp32"),
        "reconstruct": ("onnxruntime", "fp32"),
    }
    pinned = select_backend(bundle, pinned=parse_task_backends(text))
    assert pinned.backend.task_backend == {"embed": "onnxruntime", "reconstruct": "onnxruntime"}
    assert pinned.reason == "per task as pinned by task_backends" and not pinned.timings
    with pytest.raises(ValueError, match="task=backend:precision"):
        parse_task_backends("embed=onnxruntime")


def test_two_processes_share_the_port_and_drain_on_sigterm(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "service", "--model-dir", str(tiny_bundle.path), "--port", str(port),
           "--backend", "onnxruntime", "--workers", "2"]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        kids = _children(proc.pid)
        assert len(kids) == 2, kids
        # one process answering /readyz says nothing of the other (a socket takes connections only once its
        # uvicorn listens): wait for both startups in the log, each from the pinned selection, none re-timed
        while log.read_text().count("Application startup complete") < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        for _ in range(3):  # both processes must come up; then every fresh connection is answered
            ready = 0
            for _ in range(20):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                        ready += r.status == 200
                except OSError:
                    pass
            if ready == 20:
                break
            time.sleep(1)
        assert ready == 20
        for _ in range(6):  # a new connection each time: the kernel spreads them over both processes
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/embed", data=png_bytes(), headers={"content-type": "image/png"}
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200 and json.loads(r.read())["dim"] > 0
        text = log.read_text()
        assert "starting 2 processes" in text and "task_backends" not in text.split("starting 2 processes")[0]
        assert text.count("per task as pinned by task_backends") == 2  # each process loads, none re-times
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        for pid in kids:
            assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
    finally:
        if proc.poll() is None:
            proc.kill()
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
