"""The Docker image for real: build, run, wait for /readyz, POST a real image; no torch, non-root.

Needs a working `docker` (here: `bash ../shared/tools/containers.sh` puts podman behind the Docker API);
skips with a reason where there is none.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _docker_ok() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client"
    r = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True
    )
    if r.returncode != 0:
        return "no Docker engine answering (run: bash ../shared/tools/containers.sh)"
    if not (REPO / "models" / "default" / "spec.json").exists():
        return "models/default bundle missing"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shirt_png() -> bytes:
    img = np.zeros((64, 64), dtype=np.uint8)
    img[8:56, 16:48] = 200
    img[8:20, 4:60] = 200
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_image_builds_and_serves():
    reason = _docker_ok()
    if reason:
        pytest.skip(reason)
    tag = f"cae-service-test:{uuid.uuid4().hex[:8]}"
    build = subprocess.run(
        ["docker", "build", "-t", tag, str(REPO)], capture_output=True, text=True, timeout=900
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    port = _free_port()
    name = f"cae-test-{uuid.uuid4().hex[:8]}"
    run = subprocess.run(
        ["docker", "run", "-d", "--name", name, "-e", f"CAE_PORT={port}", "-p", f"{port}:{port}", tag],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
            pytest.fail("container never became ready:\n" + logs.stdout[-2000:] + logs.stderr[-2000:])
        r = httpx.post(f"{base}/embed", files={"file": ("shirt.png", _shirt_png(), "image/png")}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["shape"][0] == 1 and body["dim"] == len(body["embeddings"][0])
        r = httpx.post(
            f"{base}/reconstruct", content=_shirt_png(), headers={"Content-Type": "image/png"}, timeout=30
        )
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        # the default bundle ships the dense heads: both routes answer in the image too
        r = httpx.post(
            f"{base}/segment?format=json",
            files={"file": ("shirt.png", _shirt_png(), "image/png")},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["results"][0]["labels"]) == r.json()["results"][0]["height"]
        r = httpx.post(
            f"{base}/detect?masks=rle", files={"file": ("shirt.png", _shirt_png(), "image/png")}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["results"][0]["detections"], list)
        bad = httpx.post(f"{base}/embed", content=b"not an image", headers={"Content-Type": "image/png"})
        assert bad.status_code in (400, 415) and "error" in bad.json()
        uid = subprocess.run(
            ["docker", "exec", name, "id", "-u"], capture_output=True, text=True
        ).stdout.strip()
        assert uid != "0"
        torch_present = subprocess.run(
            ["docker", "exec", name, "python", "-c", "import torch"], capture_output=True
        )
        assert torch_present.returncode != 0, "the serving image must not contain torch"
        size = subprocess.run(
            ["docker", "image", "inspect", tag, "--format", "{{.Size}}"], capture_output=True, text=True
        )
        assert int(size.stdout.strip()) <= 600_000_000  # the 600 MB
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
