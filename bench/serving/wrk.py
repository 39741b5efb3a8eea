"""wrk as the independent load generator: one POST (body + content type) at C connections for D seconds.

wrk (``apt-get install wrk``) is a C program: at ~10-20 us of CPU per request it takes far less from the
cores it shares with the servers than any Python client. Its latency percentiles come from ``--latency``;
non-2xx answers and socket errors are counted as errors.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import HOST
from .loadgen import LevelResult, metrics_delta, process_cpu_seconds, scrape_metrics

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def tree_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` and every descendant (LitServe and ``--workers`` run several processes)."""
    import os

    try:
        parents: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    parents[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
    except OSError:
        return process_cpu_seconds(pid)
    tree, frontier = {pid}, [pid]
    while frontier:
        kids = [c for c, pp in parents.items() if pp in frontier and c not in tree]
        tree.update(kids)
        frontier = kids
    total = 0.0
    for p in tree:
        t = process_cpu_seconds(p)
        total += t or 0.0
    return total


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua(body_file: Path, content_type: str) -> str:
    return (
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
        f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()\n'
    )


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse(out: str, concurrency: int, seconds: float) -> LevelResult:
    """wrk's text report -> a LevelResult."""
    reqs = re.search(r"(\d+) requests in ([0-9.]+)(\w+)", out)
    n = int(reqs.group(1)) if reqs else 0
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    pct = {int(q): _ms(v) for q, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, flags=re.M)}
    lat = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    errors: dict[str, int] = {}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors["non-2xx"] = int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        for k, v in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            if int(v):
                errors[k] = int(v)
    return LevelResult(
        concurrency=concurrency,
        seconds=seconds,
        requests=n,
        errors=errors,
        rps=float(rps.group(1)) if rps else 0.0,
        p50_ms=pct.get(50, float("nan")),
        p90_ms=pct.get(90, float("nan")),
        p99_ms=pct.get(99, float("nan")),
        mean_ms=_ms(lat.group(1)) if lat else float("nan"),
        max_ms=_ms(lat.group(3)) if lat else float("nan"),
    )


def run_wrk(
    port: int,
    path: str,
    body: bytes,
    content_type: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    server_pid: int | None = None,
    timeout_s: float = 30.0,
    metrics: bool = False,
) -> tuple[LevelResult, dict[str, Any]]:
    """One level: ``warmup`` seconds unmeasured, then ``seconds`` measured; also the server's CPU per
    request (all its threads, from /proc) over the measured window."""
    url = f"http://{HOST}:{port}{path}"
    with tempfile.TemporaryDirectory(prefix="cae-wrk-") as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(_lua(body_file, content_type))
        threads = 1 if concurrency < 8 else 2
        base = ["wrk", f"-t{min(threads, concurrency)}", f"-c{concurrency}", "-s", str(script),
                f"--timeout={int(timeout_s)}s"]  # fmt: skip
        if warmup > 0:
            subprocess.run(
                [*base, f"-d{max(1, round(warmup))}s", url], capture_output=True, timeout=warmup + 60
            )
        before = scrape_metrics(port) if metrics else None
        cpu0 = tree_cpu_seconds(server_pid) if server_pid else None
        t0 = time.perf_counter()
        out = subprocess.run(
            [*base, f"-d{max(1, round(seconds))}s", "--latency", url],
            capture_output=True, text=True, timeout=seconds + 90,
        ).stdout  # fmt: skip
        wall = time.perf_counter() - t0
        cpu1 = tree_cpu_seconds(server_pid) if server_pid else None
        after = scrape_metrics(port) if metrics else None
    res = parse(out, concurrency, wall)
    res.server_stats = metrics_delta(before, after)
    if cpu0 is not None and cpu1 is not None and res.requests:
        res.server_cpu_ms_per_req = 1e3 * (cpu1 - cpu0) / res.requests
    return res, {"raw": out[-2000:]}
