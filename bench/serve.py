"""Serving benchmark: ``POST /embed`` on the service vs LitServe vs a naive server, on the same graph and
payload, with an independent load generator, against the same graph in-process (issue 15, item 6).

    python bench/serve.py --image-size 28                    # models/default, backend auto, 1/8/32 clients
    python bench/serve.py --bundle runs/vits --duration 10 --rounds 2 --json out.json
    python bench/serve.py --make-vits runs/vits              # build a random-init ViT-S/16 224 bundle, exit

What it does, all on 127.0.0.1 (nothing else is ever contacted), per round (``--rounds``, interleaved;
the best round per level is kept):

1. starts the service (``python -m service``, ``--workers N`` processes) and reads from ``/v1/models``
   the runtime and precision it chose for ``embed`` and its max batch; then drives ``POST /embed`` at
   each concurrency with **wrk** (``--load wrk``, the default when installed: a C load generator, ~20 us
   of CPU per request) or the built-in Python closed-loop client (``--load python``), with the same
   payload for every server: a JSON base64 body (``--payload json``, default) or the raw PNG;
2. does the same against ``bench/litserve_server.py`` (LitServe's dynamic batching, same max batch and
   wait) and ``bench/naive_server.py`` (FastAPI, one inference per request, served one at a time), both
   pinned to the service's embed runtime and precision (the same graph file);
3. loads the bundle in-process (no HTTP) and measures images/s at the max batch on the service's embed
   runtime and on **every** runtime/precision that runs here (the fastest is the reference rate), and
   the batch-1 latency;
4. prints a markdown table with the ratios (server / fastest in-process batch-N, server / LitServe,
   server / naive, c=1 p50 gap) and the issue's targets, the server CPU per request (process tree) and
   the server's ``/metrics`` (mean batch, inference time, queue wait); ``--json`` writes everything.

Pin the whole run (``taskset``) to the cores you mean to measure: load generator, servers and in-process
runs share them. Subprocesses are stopped on exit, Ctrl-C, SIGTERM and on the overall deadline
(``--max-total-s``). The parts live in ``bench/serving/``; the run never imports torch (``--make-vits``
does, and exits).
"""

import argparse
import base64
import contextlib
import importlib.util
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.serving.common import (  # noqa: E402
    _HANDLED_SIGNALS,
    HOST,
    REPO_ROOT,
    _Deadline,
    _logger,
    _on_signal,
    _Terminated,
)
from bench.serving.images import make_png  # noqa: E402
from bench.serving.inprocess import fastest_inprocess, make_vits, measure_inprocess  # noqa: E402
from bench.serving.loadgen import HttpConnection, LevelResult, build_request, load_test  # noqa: E402, F401 (bench/load_test.py uses them through this module)
from bench.serving.procs import ServerProcess, child_env, free_port, get_json  # noqa: E402
from bench.serving.report import Report  # noqa: E402
from bench.serving.wrk import available as wrk_available  # noqa: E402
from bench.serving.wrk import run_wrk  # noqa: E402


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
    p.add_argument("--no-litserve", action="store_true", help="skip the LitServe server")
    p.add_argument("--no-fastest", action="store_true", help="skip timing every runtime in-process")
    p.add_argument("--load", choices=["wrk", "python"], default="wrk" if wrk_available() else "python",
                   help="load generator (default: wrk when installed)")  # fmt: skip
    p.add_argument(
        "--payload",
        choices=["json", "png"],
        default="json",
        help="JSON base64 body (default, as clients of JSON APIs send) or the raw PNG",
    )
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the best per level is kept")
    p.add_argument("--workers", type=int, default=1, help="server processes (CAE_WORKERS)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds for a server to become ready")
    p.add_argument("--max-total-s", type=float, default=None, help="hard deadline of the whole run")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--make-vits", type=Path, default=None, metavar="DIR", help="build a ViT-S/16 224 bundle, exit"
    )
    p.add_argument("--seed", type=int, default=0, help="init seed (--make-vits) and image choice")
    return p.parse_args(argv)


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


def _payload(png: bytes, kind: str) -> tuple[bytes, str]:
    if kind == "png":
        return png, "image/png"
    return json.dumps({"images": [base64.b64encode(png).decode()]}).encode(), "application/json"


def _measure(args: argparse.Namespace, port: int, pid: int | None, body: bytes, ctype: str, levels: list[int],
             label: str, metrics: bool) -> list[LevelResult]:  # fmt: skip
    if args.load == "wrk":
        out = []
        for c in levels:
            res, _ = run_wrk(
                port,
                "/embed",
                body,
                ctype,
                c,
                args.duration,
                args.warmup,
                pid,
                args.request_timeout,
                metrics=metrics,
            )
            _logger.info(
                "%s c=%d: %.1f req/s, p50 %.2f ms, errors %s", label, c, res.rps, res.p50_ms, res.errors
            )
            out.append(res)
        return out
    payload = build_request(port, "/embed", body, ctype)
    timing = (args.warmup, args.duration, args.request_timeout)
    return load_test(port, payload, levels, *timing, label=label, server_pid=pid)


def _best(rounds: list[list[LevelResult]]) -> list[LevelResult]:
    """Per concurrency, the round with the highest req/s (rounds are interleaved across servers)."""
    if not rounds:
        return []
    return [max((r[i] for r in rounds), key=lambda x: x.rps) for i in range(len(rounds[0]))]


def run(args: argparse.Namespace) -> Report:
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency: positive integers, comma-separated")
    if args.load == "wrk" and not wrk_available():
        raise SystemExit("--load wrk: wrk is not installed (apt-get install wrk), or use --load python")
    bundle_dir = args.bundle.resolve()
    spec = json.loads((bundle_dir / "spec.json").read_text())
    png, source = make_png(args.image_size, args.image, args.seed)
    body, ctype = _payload(png, args.payload)
    _logger.info("request image: %s, PNG %d bytes, payload %s %d bytes", source, len(png), ctype, len(body))
    extra = {"CAE_ACCESS_LOG": "true" if args.access_log == "on" else "false"}
    if args.max_batch:
        extra["CAE_MAX_BATCH_SIZE"] = str(args.max_batch)
    if args.max_wait_ms is not None:
        extra["CAE_MAX_WAIT_MS"] = str(args.max_wait_ms)
    if args.workers > 1:
        extra["CAE_WORKERS"] = str(args.workers)
    for kv in args.server_env:
        k, sep, v = kv.partition("=")
        if not sep or not k.startswith("CAE_"):
            raise SystemExit(f"--server-env {kv!r}: expected CAE_NAME=value")
        extra[k] = v
    use_litserve = not args.no_litserve and importlib.util.find_spec("litserve") is not None
    if not args.no_litserve and not use_litserve:
        _logger.warning("litserve not installed (pip install -e '.[bench]'): no LitServe column")
    runs: dict[str, list[list[LevelResult]]] = {"server": [], "litserve": [], "naive": []}
    server: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cae-bench-") as tmp:
        for rnd in range(args.rounds):
            port = args.port or free_port()
            cmd = [sys.executable, "-m", "service", "--model-dir", str(bundle_dir), "--host", HOST,
                   "--port", str(port), "--backend", args.backend, "--precision", args.precision]  # fmt: skip
            with ServerProcess(f"server{rnd}", cmd, child_env(extra), port, Path(tmp)) as srv:
                ready = srv.wait_ready(args.start_timeout)
                _, card = get_json(port, "/v1/models")
                model = card["data"][0]
                be, limits = model["backend"], model["limits"]
                cap = be.get("max_batch_size")
                embed_backend = (be.get("task_backend") or {}).get("embed", be["name"])
                embed_precision = (be.get("task_precision") or {}).get("embed", be["precision"])
                server = {
                    "backend": be["name"], "precision": be["precision"], "device": be["device"],
                    "embed_backend": embed_backend, "embed_precision": embed_precision,
                    "max_batch": min(limits["max_batch_size"], cap) if cap else limits["max_batch_size"],
                    "max_wait_ms": limits["max_wait_ms"], "input_size": spec["image"]["size"],
                    "workers": args.workers, "selection": model.get("selection", {}), "readyz": ready,
                }  # fmt: skip
                _logger.info("server ready: embed on %s %s, max batch %d", embed_backend, embed_precision,
                             server["max_batch"])  # fmt: skip
                runs["server"].append(_measure(args, port, srv.pid, body, ctype, levels, "server", True))
            same = ["--backend", server["embed_backend"], "--precision", server["embed_precision"]]
            if use_litserve:
                port = free_port()
                cmd = [sys.executable, str(REPO_ROOT / "bench" / "litserve_server.py"), "--model-dir",
                       str(bundle_dir), "--port", str(port), "--max-batch", str(server["max_batch"]),
                       "--batch-timeout-ms", str(server["max_wait_ms"]), *same]  # fmt: skip
                with ServerProcess(f"litserve{rnd}", cmd, child_env({}), port, Path(tmp)) as lit:
                    lit.wait_ready(args.start_timeout)
                    runs["litserve"].append(
                        _measure(args, port, lit.pid, body, ctype, levels, "litserve", False)
                    )
            if not args.no_naive:
                port = free_port()
                cmd = [sys.executable, str(REPO_ROOT / "bench" / "naive_server.py"), "--model-dir",
                       str(bundle_dir), "--port", str(port), "--log-level", "info", *same]  # fmt: skip
                if args.access_log == "off":
                    cmd.append("--no-access-log")
                with ServerProcess(f"naive{rnd}", cmd, child_env({}), port, Path(tmp)) as naive:
                    naive.wait_ready(args.start_timeout)
                    runs["naive"].append(_measure(args, port, naive.pid, body, ctype, levels, "naive", False))

    mb = server["max_batch"]
    _logger.info("in-process: %s %s, batch %d and 1", server["embed_backend"], server["embed_precision"], mb)
    inprocess = measure_inprocess(
        bundle_dir,
        server["embed_backend"],
        server["embed_precision"],
        "cpu" if server["device"] == "cpu" else "auto",
        mb,
        png,
        args.duration,
        args.warmup,
    )
    every = {} if args.no_fastest else fastest_inprocess(bundle_dir, "auto", mb, png, min(args.duration, 5.0))
    return Report(
        bundle=str(bundle_dir),
        model_id=spec["model"]["id"],
        image={"source": source, "bytes": len(png), "size": args.image_size},
        server=server,
        server_levels=_best(runs["server"]),
        naive_levels=_best(runs["naive"]),
        litserve_levels=_best(runs["litserve"]),
        inprocess=inprocess,
        inprocess_all=every,
        settings={
            "duration": args.duration,
            "warmup": args.warmup,
            "concurrency": levels,
            "rounds": args.rounds,
            "load": "wrk" if args.load == "wrk" else "Python closed-loop client",
            "payload": "JSON base64" if args.payload == "json" else "raw image/png body",
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
