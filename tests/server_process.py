"""A real server process (``python -m service`` under uvicorn, on a free loopback port) for tests that
need one: the client, the browser pages, the README tour."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAE_")}
    env.update(PYTHONPATH=str(REPO), CAE_ACCESS_LOG="false", **extra)
    return env


@contextmanager
def running_server(bundle: Path, log: Path, *, ready_s: float = 120, **env: str) -> Iterator[Server]:
    """``python -m service`` on ``bundle`` (onnxruntime fp32), ready before it is yielded; killed after.
    ``env``: extra ``CAE_*`` settings."""
    port = free_port()
    cmd = [sys.executable, "-m", "service", "--model-dir", str(bundle), "--port", str(port),
           "--backend", "onnxruntime", "--precision", "fp32"]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(**env), stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        with httpx.Client(base_url=url, timeout=5) as c:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready in {ready_s} s:\n{log.read_text()}")
                time.sleep(0.1)
        yield Server(url, proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
