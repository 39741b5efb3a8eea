"""The command line: flags into settings, then uvicorn (one process or several workers) serving the app.

    python -m service [--model-dir DIR] [--host H] [--port P] [--backend B] [--precision P]

Flags override ``CAE_*`` environment variables, which override the defaults in ``service/settings.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any, get_args

from pydantic import ValidationError

from .settings import BackendName, PrecisionName, Settings

STARTUP_FAILURE = 3  # uvicorn's status for a lifespan that failed (e.g. "refusing to start: ...")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service", description="Serve a CAE model bundle over HTTP.")
    p.add_argument("--model-dir", help="bundle directory (default: CAE_MODEL_DIR or models/default)")
    p.add_argument("--host", help="bind address (default: CAE_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: CAE_PORT or 8000)")
    p.add_argument("--backend", choices=get_args(BackendName), help="inference runtime (default: auto)")
    p.add_argument("--precision", choices=get_args(PrecisionName), help="precision (default: auto)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--workers", type=int, help="server processes sharing the port (default: CAE_WORKERS or 1)"
    )
    return p.parse_args(argv)


def _bind_reuseport(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT: the kernel spreads new connections over every process bound
    to the same address this way (Linux, BSD)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


def run_workers(settings: Settings) -> int:
    """``workers > 1``: select the runtimes once here (timing them in N processes at once would measure
    contention), then start N ``python -m service`` processes on the same port with SO_REUSEPORT, each
    with the pinned selection (``task_backends``), its own batchers and cpus/N runtime and decode threads.
    SIGTERM/SIGINT are forwarded (each process drains its own requests); the exit status is the first
    non-zero one (3: a process refused to start), and one process dying stops the others (a supervisor
    restarts the whole set)."""
    import os
    import subprocess
    import time

    from .backends import BackendOptions, BackendUnavailable, select_backend
    from .backends.select import format_task_backends, parse_task_backends
    from .bundle import BundleError, load_bundle

    log = logging.getLogger("service")
    if settings.port == 0:
        sys.stderr.write("workers > 1 needs an explicit --port (each process binds it with SO_REUSEPORT)\n")
        return 2
    n = settings.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = settings.threads or max(1, cpus // n)
    env = {k: v for k, v in os.environ.items()}
    env.update(
        CAE_WORKERS="1",
        CAE_REUSE_PORT="true",
        CAE_THREADS=str(threads),
        CAE_DECODE_WORKERS=str(max(1, min(settings.decode_workers, cpus // n or 1))),
    )
    for key in ("model_dir", "host", "port", "backend", "precision", "log_level"):
        env[f"CAE_{key.upper()}"] = str(getattr(settings, key))
    if not settings.task_backends:
        try:
            bundle = load_bundle(settings.model_dir)
            options = BackendOptions(
                device=settings.device, threads=threads, cache_dir=settings.cache_dir,
                max_batch_size=settings.max_batch_size,
            )  # fmt: skip
            sel = select_backend(bundle, settings.backend, settings.precision, options, settings.min_cosine)
        except (BundleError, BackendUnavailable) as e:
            log.error("refusing to start: %s", e)
            return STARTUP_FAILURE
        env["CAE_TASK_BACKENDS"] = format_task_backends(sel.backend)
        sel.backend.close()
    else:
        parse_task_backends(settings.task_backends)  # fail here, once, on a malformed value
    log.info("starting %d processes on %s:%d (%d threads each): %s", n, settings.host, settings.port,
             threads, env.get("CAE_TASK_BACKENDS"))  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-m", "service"], env=env) for _ in range(n)]

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while any(p.poll() is None for p in procs):
        for p in procs:
            rc = p.poll()
            if rc not in (None, 0) and status == 0:
                status = rc if rc > 0 else 1
                forward(signal.SIGTERM, None)  # one died: stop the set
        time.sleep(0.2)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return status if status >= 0 else 1  # killed by a signal


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        sys.stderr.write(f"invalid settings: {e}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.workers > 1:
        return run_workers(settings)
    import uvicorn

    from .app import create_app

    class Server(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process dies "by signal"
        (143 under Docker and supervisors) even when every request was answered; a completed graceful
        shutdown exits 0 here. Ctrl-C (SIGINT) keeps uvicorn's behaviour."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
    )
    server = Server(config)
    server.run(sockets=[_bind_reuseport(settings.host, settings.port)] if settings.reuse_port else None)
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
