"""Overload test of the real server: capacity, then ~2x capacity for minutes, then recovery (issue 8).

    python bench/load_test.py                              # models/default, 3 minutes of overload
    python bench/load_test.py --duration 60 --json out.json
    python bench/load_test.py --quick                      # ~20 s of load in all (CI,
                                                           # tests/test_reliability.py)

Everything runs on 127.0.0.1: the server is ``python -m service`` started as a subprocess on a free port
(``bench/serving/procs.py``'s ``ServerProcess``: own process group, stopped on every exit path). Phases:

1. **capacity**: closed loop, ``--clients`` keep-alive clients each sending the next ``POST /embed`` as
   soon as the previous one answered, gives a first figure; then open-loop steps of ``--ramp-s`` seconds
   from ``--ramp-start`` x that figure, rising by ``--ramp-factor`` until a step is not served in full
   (< 97% 200s, or p99 over ``--p99-bound-ms``, twice in a row: the CPU may be shared): capacity = the
   last step that was (``--quick`` keeps the closed-loop figure);
2. **base**: open loop (requests sent on a fixed schedule, whatever the answers) at ``--base`` x capacity;
3. **overload**: open loop at ``--overload`` x capacity (default 2x) for ``--duration`` seconds;
4. **recovery**: open loop at ``--base`` x capacity again.

Open loop is what overload means: clients do not slow down because the server does. Each request takes
an idle keep-alive connection or opens one (at most ``--max-connections``; a send that finds none is
counted as ``client_saturated``, never silently skipped). Every request has a client timeout
(``--timeout``, default 35 s: above the server's 30 s deadline, so a server that times out shows as 504,
and a hang as ``timeout``). The server's RSS is sampled from ``/proc/PID/status`` once a second.

Reported per phase: offered and answered rates, status counts (429 ``queue_full`` and 503 ``overloaded``
are the server shedding load; both carry Retry-After), p50/p99 of the accepted (200) requests, client
timeouts and transport errors, RSS; and for the overload phase the same per window (``--window`` s), to
show that memory and latency stay flat. The verdict checks: no 500/504, no timeouts, shedding happened at
overload, RSS growth under ``--rss-growth-mb`` from the first to the last overload window, and recovery
(recovery-phase throughput >= 0.9 x its offered rate and nothing shed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_logger = logging.getLogger("bench.load_test")
_HERE = Path(__file__).resolve().parent
REPO_ROOT = _HERE.parent


def _load_serve_module() -> Any:
    """bench/serve.py (client, server process, payloads); bench/ is scripts, not a package."""
    spec = importlib.util.spec_from_file_location("cae_bench_serve", _HERE / "serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bs = _load_serve_module()
HOST = bs.HOST
IDLE_REUSE_S = 2.0  # reuse an idle keep-alive connection only this long (uvicorn closes them after 5 s)


# --------------------------------------------------------------------------------------------- records
@dataclass
class Sample:
    sent: float  # loop time the request was due
    latency: float  # seconds to the answer (or to the failure)
    status: int  # HTTP status; 0 = timeout, -1 = transport error, -2 = no connection free (client side)
    code: str = ""  # the error code of a JSON error body


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class PhaseResult:
    name: str
    offered_rps: float | None  # None: closed loop
    seconds: float
    sent: int
    statuses: dict[str, int]
    ok_rps: float
    answered_rps: float
    p50_ms: float | None
    p99_ms: float | None
    p99_all_ms: float | None  # every HTTP answer, rejections included
    timeouts: int
    transport_errors: int
    client_saturated: int
    rss_mb_start: float | None
    rss_mb_max: float | None
    rss_mb_end: float | None
    windows: list[dict[str, Any]] = field(default_factory=list)


def summarize(
    name: str,
    samples: list[Sample],
    t0: float,
    seconds: float,
    offered: float | None,
    rss: list[tuple[float, float]],
) -> PhaseResult:
    statuses = Counter(f"{s.status} {s.code}".strip() for s in samples)
    ok = [s.latency for s in samples if s.status == 200]
    answered = [s.latency for s in samples if s.status > 0]
    mem = [m for t, m in rss if t0 <= t <= t0 + seconds]
    ms = lambda x: None if x is None else round(x * 1e3, 2)  # noqa: E731
    return PhaseResult(
        name=name,
        offered_rps=None if offered is None else round(offered, 1),
        seconds=round(seconds, 1),
        sent=len(samples),
        statuses=dict(sorted(statuses.items())),
        ok_rps=round(len(ok) / seconds, 1),
        answered_rps=round(len(answered) / seconds, 1),
        p50_ms=ms(_pct(ok, 0.50)),
        p99_ms=ms(_pct(ok, 0.99)),
        p99_all_ms=ms(_pct(answered, 0.99)),
        timeouts=sum(s.status == 0 for s in samples),
        transport_errors=sum(s.status == -1 for s in samples),
        client_saturated=sum(s.status == -2 for s in samples),
        rss_mb_start=round(mem[0], 1) if mem else None,
        rss_mb_max=round(max(mem), 1) if mem else None,
        rss_mb_end=round(mem[-1], 1) if mem else None,
    )


# --------------------------------------------------------------------------------------------- driver
class Driver:
    """Open- and closed-loop POST /embed load with a pool of keep-alive connections."""

    def __init__(self, port: int, payload: bytes, timeout: float, max_connections: int) -> None:
        self.request = bs.build_request(port, "/embed", payload, "image/png")
        self.port, self.timeout, self.max_connections = port, timeout, max_connections
        self.idle: list[Any] = []
        self.open = 0
        self.samples: list[Sample] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def one(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        conn = None
        while self.idle:
            conn = self.idle.pop()
            if loop.time() - conn.last_used < IDLE_REUSE_S:
                break
            # the server may be closing it (keep-alive timeout): a request sent now could meet the close,
            # a client-side race that well-behaved clients avoid (or retry) and that is no server fault
            conn.close()
            self.open -= 1
            conn = None
        if conn is None and self.open < self.max_connections:
            conn = bs.HttpConnection(HOST, self.port)
            conn.last_used = loop.time()
            self.open += 1
        elif conn is None:
            self.samples.append(Sample(due, 0.0, -2))
            return
        keep = False
        try:
            status, body = await asyncio.wait_for(conn.request(self.request), self.timeout)
            self.samples.append(
                Sample(due, loop.time() - due, status, _error_code(body) if status != 200 else "")
            )
            keep = conn.writer is not None
        except TimeoutError:
            self.samples.append(Sample(due, loop.time() - due, 0))
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            self.samples.append(Sample(due, loop.time() - due, -1, type(e).__name__))
        finally:
            if keep:
                conn.last_used = loop.time()
                self.idle.append(conn)
            else:
                conn.close()
                self.open -= 1

    def _spawn(self, due: float) -> None:
        task = asyncio.create_task(self.one(due))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def open_loop(self, rate: float, seconds: float) -> tuple[float, float]:
        """Send at ``rate`` per second for ``seconds`` on a fixed schedule; returns (start, end)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        end, interval, due = start + seconds, 1.0 / rate, start
        while due < end:
            now = loop.time()
            while due <= now and due < end:  # catch up after a late wake-up: the schedule is the contract
                self._spawn(due)
                due += interval
            await asyncio.sleep(max(0.0, min(due, end) - loop.time()))
        return start, end

    async def closed_loop(self, clients: int, seconds: float) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + seconds

        async def client() -> None:
            while loop.time() < end:
                await self.one(loop.time())

        await asyncio.gather(*(client() for _ in range(clients)))
        return start, end

    async def drain(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def run_phases(args: argparse.Namespace, port: int, pid: int, payload: bytes) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    rss: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            m = rss_mb(pid)
            if m is not None:
                rss.append((loop.time(), m))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    sampling = asyncio.create_task(sampler())
    d = Driver(port, payload, args.timeout, args.max_connections)
    phases: list[PhaseResult] = []
    try:
        # warm-up (not reported): first connections, caches, the batcher's throughput estimate
        await d.closed_loop(args.clients, args.warmup)
        d.samples.clear()

        t0, t1 = await d.closed_loop(args.clients, args.capacity_s)
        cap = summarize("capacity", d.samples, t0, t1 - t0, None, rss)
        phases.append(cap)
        capacity = max(cap.ok_rps, 1.0)
        _logger.info("closed loop: %.1f req/s (p99 %s ms) at %d clients", capacity, cap.p99_ms, args.clients)
        d.samples.clear()
        if args.ramp_s > 0:
            # open-loop steps up from the closed-loop figure: capacity = the highest rate served in full
            # (>= 97% answered 200, nothing shed) with p99 within the bound
            rate = args.ramp_start * capacity
            capacity = rate  # if even the first step is not served in full, it still sets the scale
            retried = False
            while True:
                start, end = await d.open_loop(rate, args.ramp_s)
                await d.drain(args.timeout)
                step = summarize(f"ramp {rate:.0f}", d.samples, start, end - start, rate, rss)
                d.samples.clear()
                phases.append(step)
                good = (
                    step.statuses.get("200", 0) >= 0.97 * step.sent
                    and step.p99_ms is not None
                    and step.p99_ms <= args.p99_bound_ms
                )
                _logger.info(
                    "ramp %.0f req/s: 200/s %.1f, p99 %s ms -> %s",
                    rate,
                    step.ok_rps,
                    step.p99_ms,
                    "ok" if good else "over",
                )
                if not good:
                    retried = not retried
                    if retried:
                        await asyncio.sleep(args.settle_s)
                        continue  # the same rate once more
                    break
                retried = False
                capacity = rate
                rate *= args.ramp_factor
                await asyncio.sleep(args.settle_s)
            _logger.info("capacity: %.1f req/s (p99 <= %.0f ms)", capacity, args.p99_bound_ms)

        plan = [
            ("base", args.base * capacity, args.base_s),
            ("overload", args.overload_rps or args.overload * capacity, args.duration),
            ("recovery", args.base * capacity, args.recovery_s),
        ]
        spans: list[tuple[str, float, float, float]] = []
        for name, rate, seconds in plan:
            _logger.info("%s: %.1f req/s for %.0f s", name, rate, seconds)
            if name == "recovery":
                # the overload's backlog drains first; recovery is measured from a settled server
                await d.drain(args.timeout)
                await asyncio.sleep(args.settle_s)
            start, end = await d.open_loop(rate, seconds)
            spans.append((name, rate, start, end))
        await d.drain(args.timeout + 5)
        for name, rate, start, end in spans:
            samples = [s for s in d.samples if start <= s.sent < end]
            res = summarize(name, samples, start, end - start, rate, rss)
            if name == "overload":
                w = args.window
                k = 0
                while start + k * w < end:
                    a, b = start + k * w, min(end, start + (k + 1) * w)
                    ws = summarize(
                        f"{k * w:.0f}s", [s for s in samples if a <= s.sent < b], a, b - a, rate, rss
                    )
                    res.windows.append(
                        {
                            "from_s": round(k * w, 1),
                            "ok_rps": ws.ok_rps,
                            "statuses": ws.statuses,
                            "p50_ms": ws.p50_ms,
                            "p99_ms": ws.p99_ms,
                            "rss_mb_max": ws.rss_mb_max,
                        }
                    )
                    k += 1
            phases.append(res)
    finally:
        d.close()
        stop.set()
        await sampling
    return {"capacity_rps": capacity, "phases": [asdict(p) for p in phases]}


def verdict(result: dict[str, Any], rss_growth_mb: float) -> dict[str, Any]:
    ph = {p["name"]: p for p in result["phases"]}
    over, rec = ph["overload"], ph["recovery"]
    all_statuses: Counter[str] = Counter()
    for p in result["phases"]:
        all_statuses.update(p["statuses"])
    server_errors = {
        k: v for k, v in all_statuses.items() if k[:1] == "5" and not k.startswith("503 overloaded")
    }
    shed = sum(v for k, v in over["statuses"].items() if k.startswith(("429", "503 overloaded")))
    wins = [w for w in over["windows"] if w["rss_mb_max"] is not None]
    growth = wins[-1]["rss_mb_max"] - wins[0]["rss_mb_max"] if len(wins) >= 2 else 0.0
    rec_shed = sum(v for k, v in rec["statuses"].items() if k[:1] in ("4", "5"))
    checks = {
        "no_500_or_504": not server_errors,
        "no_client_timeouts": all(p["timeouts"] == 0 for p in result["phases"]),
        "sheds_at_overload": shed > 0,
        "rss_flat": growth <= rss_growth_mb,
        "recovers": rec["ok_rps"] >= 0.9 * (rec["offered_rps"] or 0) and rec_shed == 0,
    }
    return {
        "checks": checks,
        "passed": all(checks.values()),
        "server_errors": server_errors,
        "shed_at_overload": shed,
        "rss_growth_overload_mb": round(growth, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| phase | offered req/s | sent | 200/s | p50 ms (200) | p99 ms (200) | statuses | timeouts "
        "| RSS MB start/max/end |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for p in result["phases"]:
        offered = "closed loop" if p["offered_rps"] is None else f"{p['offered_rps']:.0f}"
        st = ", ".join(f"{k}: {v}" for k, v in p["statuses"].items())
        lines.append(
            f"| {p['name']} | {offered} | {p['sent']} | {p['ok_rps']:.1f} | {p['p50_ms']} | {p['p99_ms']} "
            f"| {st} "
            f"| {p['timeouts']} | {p['rss_mb_start']}/{p['rss_mb_max']}/{p['rss_mb_end']} |"
        )
    over = next(p for p in result["phases"] if p["name"] == "overload")
    lines += ["", "Overload, per window:", "", "| from s | 200/s | p50 ms | p99 ms | statuses | RSS max MB |"]
    lines.append("|---:|---:|---:|---:|---|---:|")
    for w in over["windows"]:
        st = ", ".join(f"{k}: {v}" for k, v in w["statuses"].items())
        lines.append(
            f"| {w['from_s']:.0f} | {w['ok_rps']:.1f} | {w['p50_ms']} | {w['p99_ms']} | {st} "
            f"| {w['rss_mb_max']} |"
        )
    v = result["verdict"]
    lines += ["", "Checks: " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in v["checks"].items())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(REPO_ROOT / "models" / "default"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--duration", type=float, default=180.0, help="overload seconds (default 180)")
    p.add_argument("--quick", action="store_true", help="~20 s of load in all: CI and tests")
    p.add_argument("--overload", type=float, default=2.0, help="overload rate / capacity")
    p.add_argument("--overload-rps", type=float, default=0.0, help="a fixed overload rate instead (A/B runs)")
    p.add_argument("--base", type=float, default=0.5, help="base and recovery rate / capacity")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients for the capacity phase")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--capacity-s", type=float, default=10.0)
    p.add_argument("--ramp-s", type=float, default=6.0, help="seconds per open-loop capacity step (0: skip)")
    p.add_argument("--ramp-start", type=float, default=0.6, help="first step / the closed-loop figure")
    p.add_argument("--ramp-factor", type=float, default=1.15, help="rate growth per capacity step")
    p.add_argument("--p99-bound-ms", type=float, default=500.0, help="p99 a capacity step may reach")
    p.add_argument("--base-s", type=float, default=15.0)
    p.add_argument("--recovery-s", type=float, default=15.0)
    p.add_argument("--settle-s", type=float, default=2.0, help="pause after the overload's backlog drained")
    p.add_argument("--window", type=float, default=15.0, help="overload report window, seconds")
    p.add_argument("--timeout", type=float, default=35.0, help="client timeout per request, seconds")
    p.add_argument("--max-connections", type=int, default=1024)
    p.add_argument("--rss-growth-mb", type=float, default=50.0, help="allowed RSS growth over the overload")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--env", action="append", default=[], metavar="CAE_X=V", help="server setting (repeat)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--max-total-s", type=float, default=900.0, help="hard stop for the whole run")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.capacity_s, args.base_s, args.recovery_s, args.ramp_s = 2.0, 4.0, 3.0, 4.0, 0.0
        args.duration, args.window, args.settle_s = min(args.duration, 8.0), 4.0, 1.0
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    payload, what = bs.make_png(args.image_size, "fmnist")
    port = bs.free_port()
    extra = dict(kv.split("=", 1) for kv in args.env)
    env = bs.child_env({"CAE_ACCESS_LOG": "false", **extra})
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--model-dir",
        args.bundle,
        "--port",
        str(port),
        "--backend",
        args.backend,
    ]
    with (
        tempfile.TemporaryDirectory(prefix="cae-load-") as tmp,
        bs.ServerProcess("server", cmd, env, port, Path(tmp)) as srv,
    ):
        srv.wait_ready(120)
        _, models = bs.get_json(port, "/v1/models")
        card = models["data"][0]
        result = asyncio.run(asyncio.wait_for(run_phases(args, port, srv.pid, payload), args.max_total_s))
        alive = srv.proc is not None and srv.proc.poll() is None
        status, ready = bs.get_json(port, "/readyz")
    result.update(
        command="python bench/load_test.py " + " ".join(sys.argv[1:]),
        payload=what,
        server={
            "backend": f"{card['backend']['name']} {card['backend']['precision']}",
            "limits": card["limits"],
            "settings_env": extra,
            "alive_after": alive,
            "ready_after": status == 200 and ready.get("status") == "ready",
        },
        cpus=os.cpu_count(),
        loadavg=os.getloadavg(),
    )
    result["verdict"] = verdict(result, args.rss_growth_mb)
    result["verdict"]["checks"]["alive_and_ready_after"] = (
        result["server"]["alive_after"] and result["server"]["ready_after"]
    )
    result["verdict"]["passed"] = all(result["verdict"]["checks"].values())
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    sys.stdout.write(markdown(result) + "\n")
    mean_rss = [p["rss_mb_max"] for p in result["phases"] if p["rss_mb_max"] is not None]
    _logger.info(
        "RSS max over phases: %s MB (mean %.1f)", mean_rss, statistics.fmean(mean_rss) if mean_rss else 0
    )
    return 0 if result["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
