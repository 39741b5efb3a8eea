"""Headless Chromium (Debian's ``chromium``) with the network off: only 127.0.0.1 resolves, so a page
that needs a CDN, a web font or any other host renders without it and the test sees the difference."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

OFFLINE = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium (apt-get install chromium)")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", f"--host-resolver-rules={OFFLINE}", "--no-first-run",
               "--hide-scrollbars", *args]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, timeout=timeout)


def dump_dom(url: str, budget_ms: int = 20000, timeout: float = 120) -> str:
    """The DOM after the page's scripts ran (``budget_ms`` of virtual time: timers and fetches settle)."""
    r = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    return r.stdout.decode("utf-8", "replace")


def screenshot(url: str, out: Path, size: tuple[int, int] = (1280, 1600), budget_ms: int = 20000,
               timeout: float = 120) -> Path:  # fmt: skip
    r = _run([f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}",
              f"--screenshot={out}", url], timeout)  # fmt: skip
    assert out.is_file(), r.stderr.decode("utf-8", "replace")[-2000:]
    return out
