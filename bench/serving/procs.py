"""Server subprocesses: start, wait for /readyz, stop on exit (and with the parent)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import (
    _HANDLED_SIGNALS,
    HOST,
    REPO_ROOT,
    _logger,
)


# ------------------------------------------------------------------------------------- subprocesses
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that asks Linux to SIGTERM the child if this process dies without cleaning up."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def get_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {}


class ServerProcess:
    """A server subprocess (its own process group, output to a log file) stopped on every exit path."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log_dir: Path) -> None:
        self.name, self.cmd, self.env, self.port = name, cmd, env, port
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        _logger.info("starting %s: %s", self.name, " ".join(self.cmd))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it in order
                preexec_fn=_die_with_parent(),
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready; "
                    f"log:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/readyz", timeout=2.0) as r:
                    if r.status == 200:
                        body = r.read()
                        try:
                            return dict(json.loads(body))
                        except (ValueError, TypeError):  # LitServe answers "ok"
                            return {"status": body.decode(errors="replace")}
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s; log:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # no signal of ours may interrupt this (it would leave the child running): they wait until after
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        try:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)  # its own group (start_new_session): only what we started
                try:
                    proc.wait(wait)
                    _logger.info("%s stopped (exit %s)", self.name, proc.returncode)
                    _reap_group(proc.pid, self.name)
                    return
                except subprocess.TimeoutExpired:
                    _logger.warning("%s did not stop after %s in %.0fs", self.name, sig.name, wait)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _reap_group(pgid: int, name: str, timeout: float = 10.0) -> None:
    """Wait until no process of the group is left: a server's own workers (LitServe's inference processes)
    can outlive its main process and would take cores from the in-process timing that follows."""
    t_end = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > t_end:
            _logger.warning("%s: processes of its group outlived it; killing them", name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.1)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CAE_API_KEYS", "CAE_API_KEYS_FILE")}
    env.update(PYTHONUNBUFFERED="1", CAE_SHUTDOWN_TIMEOUT_S="5")
    env.update(extra)
    return env
