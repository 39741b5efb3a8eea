"""Headless Chromium (Debian's ``chromium``) with the network off: only 127.0.0.1 resolves, so a page
that needs a CDN, a web font or any other host renders without it and the test sees the difference.

``render`` drives the browser over the DevTools protocol and waits for a condition the page itself sets
(``--virtual-time-budget`` alone can expire while images are still decoding)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest

OFFLINE = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium (apt-get install chromium)")


@dataclass(frozen=True)
class Rendered:
    dom: str  # document.documentElement.outerHTML once the condition held
    png: bytes  # a screenshot of the viewport at that moment


def render(url: str, ready_js: str, size: tuple[int, int] = (1280, 1400), timeout: float = 120) -> Rendered:
    """Open ``url`` in headless Chromium (``size`` viewport), wait until the JavaScript expression
    ``ready_js`` is truthy (polling, at most ``timeout`` seconds), then read the DOM and a screenshot."""
    ws_client = pytest.importorskip("websockets.sync.client")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--host-resolver-rules={OFFLINE}",
            "--no-first-run",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            "about:blank",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            endpoint = _devtools_endpoint(proc, timeout)
            with ws_client.connect(endpoint, max_size=None, open_timeout=timeout) as ws:
                cdp = _Session(ws)
                target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
                session = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
                page = _Session(ws, session)
                page.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                          deviceScaleFactor=1, mobile=False)  # fmt: skip
                page.call("Page.enable")
                page.call("Page.navigate", url=url)
                deadline = time.monotonic() + timeout
                while not page.evaluate(f"Boolean({ready_js})"):
                    if time.monotonic() > deadline:
                        dom = page.evaluate("document.documentElement.outerHTML")
                        raise AssertionError(f"page not ready in {timeout} s ({ready_js}):\n{dom[-3000:]}")
                    time.sleep(0.2)
                dom = page.evaluate("document.documentElement.outerHTML")
                shot = page.call("Page.captureScreenshot", format="png")["data"]
                return Rendered(dom, base64.b64decode(shot))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the browser and its renderer / zygote children
            proc.wait()


def _devtools_endpoint(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        m = re.search(r"DevTools listening on (ws://\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError("Chromium did not open its DevTools endpoint")


class _Session:
    """One DevTools protocol session (the browser's, or a page's with ``session_id``) on a websocket."""

    _ids = iter(range(1, 1 << 31))

    def __init__(self, ws: object, session_id: str | None = None) -> None:
        self.ws, self.session_id = ws, session_id

    def call(self, method: str, **params: object) -> dict:
        msg_id = next(self._ids)
        msg: dict[str, object] = {"id": msg_id, "method": method, "params": params}
        if self.session_id:
            msg["sessionId"] = self.session_id
        self.ws.send(json.dumps(msg))  # type: ignore[attr-defined]
        while True:
            reply = json.loads(self.ws.recv())  # type: ignore[attr-defined]
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")
