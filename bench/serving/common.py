"""Constants and small helpers shared by the serving benchmark's modules."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"  # the only address this benchmark ever talks to
FMNIST_TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TARGET_INPROCESS_RATIO = 0.85
TARGET_LITSERVE_RATIO = 2.0
TARGET_P50_GAP_MS = 2.0  # issue 15: c=1 p50 within 2 ms of in-process batch 1

_logger = logging.getLogger("bench.serve")


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if values else float("nan")


class _Deadline(Exception):
    pass


class _Terminated(Exception):
    pass


_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGALRM:
        raise _Deadline("the run passed --max-total-s")
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated(signal.Signals(signum).name)


def _on_signal(signum: int, _frame: Any) -> None:
    _raise_for(signum)
