"""``python -m service [--model-dir DIR] [--host H] [--port P] [--backend B] [--precision P]``.

Flags override ``CAE_*`` environment variables, which override the defaults in ``service/settings.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
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
    return p.parse_args(argv)


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
    server.run()
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
