"""What a run reports: ``metrics.jsonl`` (and TensorBoard), rate-limited progress lines and ETAs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

__all__ = ["LOG_INTERVAL_S", "MetricsWriter", "Progress", "fmt_eta"]

_logger = logging.getLogger("training")

LOG_INTERVAL_S = 20.0


def fmt_eta(seconds: float) -> str:
    """``H:MM:SS`` (never negative)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    """JSONL (always) and TensorBoard (if installed and asked for), on the main process only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                _logger.info("tensorboard not installed; metrics go to %s only", self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint (they will be produced again)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Rate and ETA log lines, at most every ``LOG_INTERVAL_S`` seconds (plus the last). ``start``: the
    units already done before this process began (a resumed run), left out of the rate."""

    def __init__(
        self, what: str, total: int, unit: str = "img", logger: logging.Logger | None = None, start: int = 0
    ) -> None:
        self.what, self.total, self.unit, self.start = what, total, unit, start
        self.logger = logger or _logger
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < LOG_INTERVAL_S and done < self.total:
            return
        self.last = now
        rate = max(done - self.start, 0) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        self.logger.info(
            "%s: %d/%d %s (%.1f %s/s, ETA %s)%s",
            self.what,
            done,
            self.total,
            self.unit,
            rate,
            self.unit,
            fmt_eta(eta),
            f" {extra}" if extra else "",
        )
