"""Serving benchmark: throughput and latency of ``POST /embed`` under concurrency, side by side with the
same bundle in-process and with a naive one-inference-per-request server (issue 5, item 6).

    python bench/serve.py                                    # models/default, backend auto, 1/8/32 clients
    python bench/serve.py --bundle runs/vits --backend openvino --duration 10 --json out.json
    python bench/serve.py --make-vits runs/vits              # build a random-init ViT-S/16 224 bundle, exit

What it does, all on 127.0.0.1 (nothing else is ever contacted):

1. starts the real server (``python -m service --model-dir BUNDLE --port P --backend X``) as a
   subprocess, waits for ``/readyz``, reads the backend, precision and max batch it chose from
   ``/v1/models``, then drives ``POST /embed`` (one PNG as a raw ``image/png`` body, JSON response) with
   a closed-loop load generator at each concurrency: C clients, each on its own keep-alive connection,
   sending the next request as soon as the previous answered, for ``--warmup`` then ``--duration``
   seconds. Only requests that complete inside the measured window count; anything but 200 is an error.
   The client is a minimal HTTP/1.1 implementation on asyncio streams: ~0.2 ms of client CPU per
   request against ~1.8 ms for an httpx.AsyncClient (measured on this machine), which matters when
   client and server share two cores. Reported per level as well: the CPU time the server process (all
   threads) and the client spent per request, and from the server's ``/metrics`` the mean batch formed,
   time per inference call, preprocessing time per image and queue wait;
2. does the same against ``bench/naive_server.py`` (FastAPI + PIL + numpy + one ONNX Runtime fp32
   ``run`` per request, served one at a time; same access-log setting as the server, ``--access-log``);
3. loads the same bundle in-process with the service's own classes (``load_bundle`` +
   ``select_backend`` at the backend and precision the server chose, so the same runtime and precision)
   and measures images/s at batch = the server's max batch and the batch-1 latency, on the same
   preprocessed image;
4. prints a markdown table and the issue's targets (at the highest concurrency, 32 by default: server /
   in-process batched >= 0.85 and server / naive >= 3; at concurrency 1: server p50 - in-process batch-1
   p50 <= 5 ms), and with ``--json`` writes everything.

Client, servers and in-process runs share the machine's cores, as they would on a 2-core box: pin the
whole run (``taskset``) to the cores you mean to measure. Subprocesses are stopped on exit, Ctrl-C,
SIGTERM and on the overall deadline (``--max-total-s``); every network wait has a timeout. The run
never imports torch (``--make-vits`` does, and exits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

_logger = logging.getLogger("bench.serve")

HOST = "127.0.0.1"  # the only address this benchmark ever talks to
FMNIST_TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TARGET_INPROCESS_RATIO = 0.85
TARGET_NAIVE_RATIO = 3.0
TARGET_P50_GAP_MS = 5.0


# ------------------------------------------------------------------------------------------ images
def fmnist_test_image(index: int = 0, path: Path = FMNIST_TEST_IMAGES) -> Image.Image | None:
    """One Fashion-MNIST test image (28x28 L) read straight from the idx file (no torch), or None."""
    if not path.is_file():
        return None
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        magic = f.read(4)
        if magic[:2] != b"\x00\x00" or magic[2] != 0x08 or magic[3] != 3:
            _logger.warning("%s: not an idx3 uint8 file; using a generated image", path)
            return None
        n, h, w = (int.from_bytes(f.read(4), "big") for _ in range(3))
        index %= n
        f.seek(16 + index * h * w)
        data = f.read(h * w)
    return Image.fromarray(np.frombuffer(data, np.uint8).reshape(h, w), mode="L")


def photo_like_image(size: int, seed: int = 0) -> Image.Image:
    """An RGB image with photo-like statistics (1/f noise over smooth shapes), so PNG sizes and decode
    times resemble a photo rather than a flat test pattern."""
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size, 3), np.float32)
    for octave in range(7):
        cells = 2**octave + 1
        for c in range(3):
            field_ = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), mode="F")
            up = np.asarray(field_.resize((size, size), Image.Resampling.BICUBIC), np.float32)
            out[:, :, c] += up * 60.0 / (1.6**octave)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out += (np.stack([xx, yy, 1 - xx], -1) * 80.0)[..., :3]
    out += rng.normal(0, 4, out.shape)
    return Image.fromarray(np.clip(out + 60, 0, 255).astype(np.uint8), mode="RGB")


def make_png(size: int, source: str, seed: int = 0) -> tuple[bytes, str]:
    """The request body: a PNG of ``size`` x ``size`` from ``source`` (fmnist | photo | a file path)."""
    img: Image.Image | None = None
    what = source
    if source == "fmnist":
        img = fmnist_test_image(seed)
        if img is None:
            _logger.warning(
                "Fashion-MNIST not found at %s; using a generated photo-like image", FMNIST_TEST_IMAGES
            )
            source = "photo"
        else:
            img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            what = f"Fashion-MNIST test image {seed} upscaled 28 -> {size}"
    if source == "photo":
        img = photo_like_image(size, seed)
        what = f"generated photo-like RGB {size}x{size}"
    elif img is None:
        with Image.open(source) as im:
            img = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        what = f"{source} resized to {size}x{size}"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), what


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


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if values else float("nan")


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
                "%s c=%d: %.1f req/s, p50 %.2f ms, p99 %.2f ms, %d ok, errors %s; CPU ms/req server %s client %s",
                label, c, r.rps, r.p50_ms, r.p99_ms, r.requests, r.errors or "none",
                _fmt(r.server_cpu_ms_per_req), _fmt(r.client_cpu_ms_per_req),
            )  # fmt: skip
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
                    f"{self.name} exited with {self.proc.returncode} before it was ready; log:\n{self.log_tail()}"
                )
            try:
                status, doc = get_json(self.port, "/readyz", timeout=2.0)
                if status == 200:
                    return doc
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
                    return
                except subprocess.TimeoutExpired:
                    _logger.warning("%s did not stop after %s in %.0fs", self.name, sig.name, wait)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CAE_API_KEYS", "CAE_API_KEYS_FILE")}
    env.update(PYTHONUNBUFFERED="1", CAE_SHUTDOWN_TIMEOUT_S="5")
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------- in-process
def _time_calls(fn: Callable[[], Any], seconds: float, min_calls: int = 5) -> list[float]:
    """Durations of back-to-back calls of ``fn`` for ``seconds`` (at least ``min_calls``)."""
    durations: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(durations) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - t0)
    return durations


def measure_inprocess(
    bundle_dir: Path,
    backend: str,
    precision: str,
    device: str,
    max_batch: int,
    png: bytes,
    seconds: float,
    warmup: float,
) -> dict[str, Any]:
    """The bundle's embed graph in this process on the server's backend and precision, no HTTP."""
    from service.backends import BackendOptions, select_backend
    from service.bundle import load_bundle
    from service.imaging import Limits, Preprocessor

    bundle = load_bundle(bundle_dir)
    options = BackendOptions(device=device, max_batch_size=max_batch)
    be = select_backend(bundle, backend, precision, options).backend
    try:
        pre = Preprocessor(bundle.image, Limits(max_pixels=1 << 31, min_side=1))
        x1 = pre(png)[None]
        xb = np.repeat(x1, max_batch, axis=0)

        def batched() -> None:
            be.infer("embed", {"images": xb})

        def single() -> None:
            be.infer("embed", {"images": x1})

        _time_calls(batched, warmup, 2)
        _time_calls(single, min(warmup, 1.0), 2)
        t_batched = _time_calls(batched, seconds)
        t_single = _time_calls(single, seconds)
        t_pre = _time_calls(lambda: pre(png), min(seconds, 2.0))
    finally:
        be.close()
    return {
        "backend": be.name,
        "precision": be.precision,
        "device": be.device,
        "max_batch": max_batch,
        "batched_img_per_s": max_batch * len(t_batched) / sum(t_batched),
        "batched_call_p50_ms": _ms(t_batched, 50),
        "batch1_img_per_s": len(t_single) / sum(t_single),
        "batch1_p50_ms": _ms(t_single, 50),
        "batch1_p99_ms": _ms(t_single, 99),
        "preprocess_p50_ms": _ms(t_pre, 50),
        "calls": {"batched": len(t_batched), "batch1": len(t_single), "preprocess": len(t_pre)},
    }


# ------------------------------------------------------------------------------------- ViT-S bundle
def make_vits(out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """A random-init (seeded) CAE ViT-S/16 at 224 (6 heads), exported with the embed graph only."""
    import torch

    from export.onnx_export import export_bundle
    from training.models import create_model, save_model

    torch.manual_seed(seed)
    model = create_model("cae_small_patch16_224", num_heads=6, target="pixel").eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_model(model, Path(tmp) / f"cae-vits16-224-random-seed{seed}.safetensors")
        return export_bundle(ckpt, out_dir, tasks=("embed",))


# ------------------------------------------------------------------------------------------ report
@dataclass
class Report:
    bundle: str
    model_id: str
    image: dict[str, Any]
    server: dict[str, Any]
    server_levels: list[LevelResult]
    naive_levels: list[LevelResult] = field(default_factory=list)
    inprocess: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def level(self, which: list[LevelResult], c: int) -> LevelResult | None:
        return next((r for r in which if r.concurrency == c), None)

    def targets(self) -> dict[str, Any]:
        cs = [r.concurrency for r in self.server_levels]
        hi = 32 if 32 in cs else max(cs)
        lo = min(cs)
        s_hi, s_lo = self.level(self.server_levels, hi), self.level(self.server_levels, lo)
        n_hi = self.level(self.naive_levels, hi)
        out: dict[str, Any] = {"high_concurrency": hi, "low_concurrency": lo}
        batched = self.inprocess.get("batched_img_per_s")
        if s_hi and batched:
            v = s_hi.rps / batched
            out["server_vs_inprocess"] = {
                "value": v,
                "goal": TARGET_INPROCESS_RATIO,
                "met": v >= TARGET_INPROCESS_RATIO,
            }
        if s_hi and n_hi and n_hi.rps > 0:
            v = s_hi.rps / n_hi.rps
            out["server_vs_naive"] = {"value": v, "goal": TARGET_NAIVE_RATIO, "met": v >= TARGET_NAIVE_RATIO}
        b1 = self.inprocess.get("batch1_p50_ms")
        if s_lo and lo == 1 and b1 is not None:
            v = s_lo.p50_ms - b1
            out["p50_gap_ms"] = {"value": v, "goal": TARGET_P50_GAP_MS, "met": v <= TARGET_P50_GAP_MS}
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "model_id": self.model_id,
            "image": self.image,
            "server": {**self.server, "levels": [asdict(r) for r in self.server_levels]},
            "naive": {"levels": [asdict(r) for r in self.naive_levels]},
            "inprocess": self.inprocess,
            "targets": self.targets(),
            "settings": self.settings,
        }

    def markdown(self) -> str:
        s, ip = self.server, self.inprocess
        mb = s["max_batch"]
        lines = [
            f"### `POST /embed`: {self.model_id} ({s['input_size']}x{s['input_size']}), "
            f"server on {s['backend']} {s['precision']} ({s['device']}), max batch {mb}, "
            f"max wait {s['max_wait_ms']} ms",
            "",
            f"Request: {self.image['source']}, PNG {self.image['bytes']} bytes, raw `image/png` body, "
            f"JSON response (cls). {self.settings['duration']:g} s per level after "
            f"{self.settings['warmup']:g} s warm-up; {self.settings['cpus']}.",
            "",
            "| clients | server req/s | p50 ms | p99 ms | naive req/s | naive p50 ms | naive p99 ms "
            f"| server / in-process b{mb} | server / naive | errors (server, naive) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        batched = ip.get("batched_img_per_s")
        for r in self.server_levels:
            n = self.level(self.naive_levels, r.concurrency)
            cells = [
                str(r.concurrency),
                f"{r.rps:.1f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{n.rps:.1f}" if n else "-",
                f"{n.p50_ms:.2f}" if n else "-",
                f"{n.p99_ms:.2f}" if n else "-",
                f"{r.rps / batched:.2f}" if batched else "-",
                f"{r.rps / n.rps:.2f}x" if n and n.rps > 0 else "-",
                f"{sum(r.errors.values())}, {sum(n.errors.values()) if n else '-'}",
            ]
            lines.append("| " + " | ".join(cells) + " |")

        def cpu_line(name: str, which: list[LevelResult]) -> str:
            return f"{name} " + ", ".join(
                f"c={r.concurrency}: {_fmt(r.server_cpu_ms_per_req)}" for r in which
            )

        cpu = [cpu_line("server", self.server_levels)]
        if self.naive_levels:
            cpu.append(cpu_line("naive", self.naive_levels))
        client = ", ".join(_fmt(r.client_cpu_ms_per_req) for r in self.server_levels)
        lines += [
            "",
            f"CPU ms per request (server process, all threads): {'; '.join(cpu)}. "
            f"Load generator: {client} ms per request.",
        ]
        stats = [(r.concurrency, r.server_stats) for r in self.server_levels if r.server_stats]
        if stats:
            lines += [
                "",
                "Server `/metrics` per level (warm-up included): "
                + "; ".join(
                    f"c={c}: mean batch {_fmt(st.get('mean_batch'), '.1f')}, "
                    f"{_fmt(st.get('inference_mean_ms'))} ms per inference call, "
                    f"preprocess {_fmt(st.get('preprocess_mean_ms'))} ms/image, "
                    f"queue wait {_fmt(st.get('queue_wait_mean_ms'))} ms"
                    for c, st in stats
                )
                + ".",
            ]
        if ip:
            lines += [
                "",
                f"In-process ({ip['backend']} {ip['precision']}, same bundle, preprocessed image, no HTTP): "
                f"batch {mb}: **{ip['batched_img_per_s']:.1f} img/s** ({ip['batched_call_p50_ms']:.2f} ms "
                f"per call); batch 1: p50 **{ip['batch1_p50_ms']:.2f} ms**, p99 {ip['batch1_p99_ms']:.2f} ms "
                f"({ip['batch1_img_per_s']:.1f} img/s); decode + resize + normalize of this PNG "
                f"(service Preprocessor, one thread): p50 {ip['preprocess_p50_ms']:.2f} ms.",
            ]
        t = self.targets()
        hi = t["high_concurrency"]
        rows = [
            (
                "server_vs_inprocess",
                f"c={hi}: server req/s / in-process batch-{mb} img/s",
                ">= 0.85",
                "{:.2f}",
            ),
            ("server_vs_naive", f"c={hi}: server req/s / naive req/s", ">= 3x", "{:.2f}x"),
            ("p50_gap_ms", "c=1: server p50 - in-process batch-1 p50", "<= 5 ms", "{:.2f} ms"),
        ]
        lines += ["", "| target | measured | goal | met |", "|---|---:|---:|---|"]
        for key, label, goal, fmt in rows:
            if key in t:
                lines.append(
                    f"| {label} | {fmt.format(t[key]['value'])} | {goal} | {'yes' if t[key]['met'] else 'NO'} |"
                )
            else:
                lines.append(f"| {label} | not measured | {goal} | - |")
        return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="bundle directory")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino", "tensorrt"])
    p.add_argument("--precision", default="auto", help="server precision (auto | fp32 | bf16 | int8 | fp16)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--max-batch", type=int, default=None, help="server max batch (CAE_MAX_BATCH_SIZE)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="server batching wait (CAE_MAX_WAIT_MS)")
    p.add_argument("--image-size", type=int, default=224, help="side of the square PNG sent (pixels)")
    p.add_argument("--image", default="fmnist", help="fmnist (a test image) | photo (generated) | a file")
    p.add_argument(
        "--access-log", choices=["on", "off"], default="on", help="per-request access log, both servers"
    )
    p.add_argument(
        "--server-env", action="append", default=[], metavar="CAE_X=V", help="more server settings"
    )
    p.add_argument("--no-naive", action="store_true", help="skip the naive server")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds for a server to become ready")
    p.add_argument("--max-total-s", type=float, default=None, help="hard deadline of the whole run")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--make-vits", type=Path, default=None, metavar="DIR", help="build a ViT-S/16 224 bundle, exit"
    )
    p.add_argument("--seed", type=int, default=0, help="init seed (--make-vits) and image choice")
    return p.parse_args(argv)


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


def _finite(x: Any) -> Any:
    """``x`` with NaN / inf (a level without answers) as null, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _cpus() -> str:
    try:
        cores = sorted(os.sched_getaffinity(0))
        return f"{len(cores)} CPU core(s) {cores} of {os.cpu_count()}, shared by client and servers"
    except AttributeError:
        return f"{os.cpu_count()} CPU cores, shared by client and servers"


@contextlib.contextmanager
def _signals(total_s: float) -> Iterator[None]:
    # SIGINT stays ignored where the caller ignores it (a background job of a non-interactive shell)
    sigs = [s for s in _HANDLED_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, _on_signal) for s in sigs}
    signal.setitimer(signal.ITIMER_REAL, total_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in old.items():
            signal.signal(s, h)


def run(args: argparse.Namespace) -> Report:
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency: positive integers, comma-separated")
    bundle_dir = args.bundle.resolve()
    spec = json.loads((bundle_dir / "spec.json").read_text())
    png, source = make_png(args.image_size, args.image, args.seed)
    _logger.info("request image: %s, PNG %d bytes", source, len(png))
    extra = {"CAE_ACCESS_LOG": "true" if args.access_log == "on" else "false"}
    if args.max_batch:
        extra["CAE_MAX_BATCH_SIZE"] = str(args.max_batch)
    if args.max_wait_ms is not None:
        extra["CAE_MAX_WAIT_MS"] = str(args.max_wait_ms)
    for kv in args.server_env:
        k, sep, v = kv.partition("=")
        if not sep or not k.startswith("CAE_"):
            raise SystemExit(f"--server-env {kv!r}: expected CAE_NAME=value")
        extra[k] = v
    timing = (args.warmup, args.duration, args.request_timeout)

    with tempfile.TemporaryDirectory(prefix="cae-bench-") as tmp:
        port = free_port()
        cmd = [sys.executable, "-m", "service", "--model-dir", str(bundle_dir), "--host", HOST,
               "--port", str(port), "--backend", args.backend, "--precision", args.precision]  # fmt: skip
        with ServerProcess("server", cmd, child_env(extra), port, Path(tmp)) as srv:
            ready = srv.wait_ready(args.start_timeout)
            _, card = get_json(port, "/v1/models")
            model = card["data"][0]
            be, limits = model["backend"], model["limits"]
            cap = be.get("max_batch_size")
            server = {
                "backend": be["name"],
                "precision": be["precision"],
                "device": be["device"],
                "max_batch": min(limits["max_batch_size"], cap) if cap else limits["max_batch_size"],
                "max_wait_ms": limits["max_wait_ms"],
                "input_size": spec["image"]["size"],
                "selection": model.get("selection", {}),
                "readyz": ready,
            }
            _logger.info("server ready: %s %s on %s, max batch %d", be["name"], be["precision"], be["device"],
                         server["max_batch"])  # fmt: skip
            payload = build_request(port, "/embed", png, "image/png")
            server_levels = load_test(port, payload, levels, *timing, label="server", server_pid=srv.pid)

        naive_levels: list[LevelResult] = []
        if not args.no_naive:
            port = free_port()
            cmd = [sys.executable, str(REPO_ROOT / "bench" / "naive_server.py"), "--model-dir", str(bundle_dir),
                   "--port", str(port), "--log-level", "info"]  # fmt: skip
            if args.access_log == "off":
                cmd.append("--no-access-log")
            with ServerProcess("naive", cmd, child_env({}), port, Path(tmp)) as naive:
                naive.wait_ready(args.start_timeout)
                payload = build_request(port, "/embed", png, "image/png")
                naive_levels = load_test(port, payload, levels, *timing, label="naive", server_pid=naive.pid)

    _logger.info(
        "in-process: %s %s, batch %d and 1", server["backend"], server["precision"], server["max_batch"]
    )
    inprocess = measure_inprocess(
        bundle_dir, server["backend"], server["precision"], server["device"], server["max_batch"], png,
        args.duration, args.warmup,
    )  # fmt: skip
    return Report(
        bundle=str(bundle_dir),
        model_id=spec["model"]["id"],
        image={"source": source, "bytes": len(png), "size": args.image_size},
        server=server,
        server_levels=server_levels,
        naive_levels=naive_levels,
        inprocess=inprocess,
        settings={
            "duration": args.duration,
            "warmup": args.warmup,
            "concurrency": levels,
            "request_timeout_s": args.request_timeout,
            "server_env": extra,
            "cpus": _cpus(),
            "python": sys.version.split()[0],
            "torch_imported": "torch" in sys.modules,
            "finished_unix": time.time(),
        },
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.make_vits is not None:
        spec = make_vits(args.make_vits, args.seed)
        _logger.info("wrote %s (%s); benchmark it with: python bench/serve.py --bundle %s",
                     args.make_vits, spec["model"]["id"], args.make_vits)  # fmt: skip
        return 0
    levels = len([c for c in args.concurrency.split(",") if c.strip()])
    per_server = args.start_timeout + levels * (args.warmup + args.duration + args.request_timeout + 15)
    total = args.max_total_s or 2 * per_server + 3 * (args.duration + args.warmup) + 120
    try:
        with _signals(total):
            report = run(args)
    except _Deadline as e:
        _logger.error("%s (%.0f s); subprocesses were stopped", e, total)
        return 124
    except KeyboardInterrupt:
        _logger.error("interrupted; subprocesses were stopped")
        return 130
    except _Terminated as e:
        _logger.error("%s received; subprocesses were stopped", e)
        return 143
    doc = report.to_json()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n")
        _logger.info("wrote %s", args.json)
    sys.stdout.write(report.markdown())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
