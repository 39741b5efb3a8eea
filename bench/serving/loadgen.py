"""The Python closed-loop load generator (minimal HTTP/1.1 on asyncio) and /proc, /metrics readers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    _HANDLED_SIGNALS,
    HOST,
    _fmt,
    _logger,
    _ms,
    _on_signal,
    _raise_for,
)


# ------------------------------------------------------------------------------------ HTTP client
class HttpConnection:
    """One keep-alive HTTP/1.1 connection that sends a prepared request and reads the whole answer."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(payload)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = await self._read_chunked()
        else:  # body until EOF: the server closes the connection
            body = await self.reader.read()
            self.close()
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, body

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers from our servers
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def build_request(port: int, path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nAccept: application/json\r\nUser-Agent: cae-bench\r\n\r\n"
    )
    return head.encode("ascii") + body


@dataclass
class LevelResult:
    concurrency: int
    seconds: float
    requests: int  # 200 answers completed inside the window
    errors: dict[str, int]  # non-200 status or exception name -> count (inside the window)
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    server_cpu_ms_per_req: float | None = None  # the server process's CPU time (all threads) / requests
    client_cpu_ms_per_req: float | None = None  # this load generator's CPU time / requests
    # from the server's /metrics, over the level (warm-up included): mean batch formed, mean ms per
    # inference call, per image preprocessing and queue wait
    server_stats: dict[str, float] | None = None


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", re.MULTILINE)
_STATS = {
    "batch": "cae_batch_size",
    "inference": "cae_inference_duration_seconds",
    "preprocess": "cae_preprocess_duration_seconds",
    "queue_wait": "cae_queue_wait_seconds",
}


def scrape_metrics(port: int, timeout: float = 5.0) -> dict[str, float] | None:
    """Sums and counts of the server's batching histograms (embed task), or None without /metrics."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    out: dict[str, float] = {}
    wanted = {
        metric + suffix: key + suffix for key, metric in _STATS.items() for suffix in ("_sum", "_count")
    }
    for m in _SAMPLE.finditer(text):
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        if name in wanted and ('task="' not in labels or 'task="embed"' in labels):
            out[wanted[name]] = out.get(wanted[name], 0.0) + float(value)
    return out or None


def metrics_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if not before or not after:
        return None
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    stats: dict[str, float] = {}
    if d.get("batch_count"):
        stats["mean_batch"] = d["batch_sum"] / d["batch_count"]
    for key in ("inference", "preprocess", "queue_wait"):
        if d.get(f"{key}_count"):
            stats[f"{key}_mean_ms"] = d[f"{key}_sum"] * 1e3 / d[f"{key}_count"]
    return stats or None


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads) from /proc, or None where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def run_level(
    port: int,
    payload: bytes,
    concurrency: int,
    warmup: float,
    duration: float,
    timeout: float,
    server_pid: int | None = None,
) -> LevelResult:
    """``concurrency`` closed-loop clients for ``warmup`` + ``duration`` seconds; stats of the window
    (and the CPU time the server process and this client spent in it)."""
    t_start = time.perf_counter() + warmup
    t_end = t_start + duration
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def client() -> None:
        conn = HttpConnection(HOST, port)
        try:
            while (begin := time.perf_counter()) < t_end:
                try:
                    status, _ = await asyncio.wait_for(conn.request(payload), timeout)
                    outcome = "ok" if status == 200 else str(status)
                except TimeoutError:
                    outcome = "timeout"
                    conn.close()
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                    outcome = type(e).__name__
                    conn.close()
                    await asyncio.sleep(0.01)  # do not spin on a refused connection
                end = time.perf_counter()
                if t_start <= end <= t_end:
                    if outcome == "ok":
                        latencies.append(end - begin)
                    else:
                        errors[outcome] += 1
        finally:
            conn.close()

    cpu: dict[str, float | None] = {}

    async def cpu_sampler() -> None:
        for edge, t in (("start", t_start), ("end", t_end)):
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            cpu[f"server_{edge}"] = process_cpu_seconds(server_pid) if server_pid else None
            cpu[f"client_{edge}"] = time.process_time()

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    tasks.append(asyncio.create_task(cpu_sampler()))
    try:
        _, pending = await asyncio.wait(tasks, timeout=warmup + duration + timeout + 10)
        if pending:
            raise TimeoutError(f"{len(pending)} clients still busy past the level's deadline")
        for t in tasks:
            t.result()  # a client's unexpected exception surfaces here
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each closes its connection

    def per_request(who: str) -> float | None:
        a, b = cpu.get(f"{who}_start"), cpu.get(f"{who}_end")
        return (b - a) * 1e3 / len(latencies) if a is not None and b is not None and latencies else None

    return LevelResult(
        concurrency=concurrency,
        seconds=duration,
        requests=len(latencies),
        errors=dict(errors),
        rps=len(latencies) / duration,
        p50_ms=_ms(latencies, 50),
        p90_ms=_ms(latencies, 90),
        p99_ms=_ms(latencies, 99),
        mean_ms=float(np.mean(latencies) * 1e3) if latencies else float("nan"),
        max_ms=float(np.max(latencies) * 1e3) if latencies else float("nan"),
        server_cpu_ms_per_req=per_request("server"),
        client_cpu_ms_per_req=per_request("client"),
    )


async def probe(port: int, payload: bytes, timeout: float) -> dict[str, Any]:
    """One request: must answer 200 with JSON embeddings (so a benchmark never times error pages)."""
    conn = HttpConnection(HOST, port)
    try:
        status, body = await asyncio.wait_for(conn.request(payload), timeout)
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"probe request answered {status}: {body[:300]!r}")
    doc = json.loads(body)
    if not doc.get("embeddings") or not doc["embeddings"][0]:
        raise RuntimeError(f"probe response has no embeddings: {body[:300]!r}")
    return doc


def load_test(
    port: int,
    payload: bytes,
    levels: list[int],
    warmup: float,
    duration: float,
    timeout: float,
    label: str,
    server_pid: int | None = None,
) -> list[LevelResult]:
    async def all_levels() -> list[LevelResult]:
        doc = await probe(port, payload, timeout)
        _logger.info("%s: probe ok (dim %s)", label, len(doc["embeddings"][0]))
        results = []
        for c in levels:
            before = scrape_metrics(port)
            r = await run_level(port, payload, c, warmup, duration, timeout, server_pid)
            r.server_stats = metrics_delta(before, scrape_metrics(port))
            if r.server_stats:
                _logger.info(
                    "%s c=%d server metrics: %s",
                    label,
                    c,
                    {k: round(v, 2) for k, v in r.server_stats.items()},
                )
            _logger.info(
                "%s c=%d: %.1f req/s, p50 %.2f ms, p99 %.2f ms, %d ok, errors %s; "
                "CPU ms/req server %s client %s",
                label,
                c,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.requests,
                r.errors or "none",
                _fmt(r.server_cpu_ms_per_req),
                _fmt(r.client_cpu_ms_per_req),
            )
            results.append(r)
        return results

    async def guarded() -> list[LevelResult]:
        # Signals arrive while the loop waits in select(): let them cancel the run cleanly (every client
        # closes its connection), then turn into the same exception as outside the loop.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        fired: list[int] = []
        sigs = [s for s in _HANDLED_SIGNALS if signal.getsignal(s) is _on_signal]
        for s in sigs:
            loop.add_signal_handler(s, lambda s=s: (fired.append(s), task.cancel()))
        try:
            return await all_levels()
        except asyncio.CancelledError:
            if fired:
                _raise_for(fired[0])
            raise
        finally:
            for s in sigs:
                loop.remove_signal_handler(s)
                signal.signal(s, _on_signal)

    return asyncio.run(guarded())
