"""Throughput and accuracy of a bundle's embed graph per runtime x precision, as ratios to ONNX Runtime fp32
measured in the same run (these machines are noisy: compare ratios, not absolute numbers across runs).

    python bench/export_variants.py BUNDLE [--batch 8] [--seconds 5] [--threads N]

Rows: ORT fp32 (baseline), ORT fp16 / int8 graphs when the bundle has them, OpenVINO fp32 and bf16
(INFERENCE_PRECISION_HINT; fast on CPUs with AMX or AVX512-BF16) when ``openvino`` is installed.
Accuracy: the minimum cosine of the pooled (cls) embedding to ORT fp32 on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.bundle_format import min_row_cosine

_logger = logging.getLogger("bench")


def rate(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, seconds: float) -> float:
    fn(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def ort_runner(path: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x})[0]


def openvino_runner(path: Path, precision: str, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    # the service's configuration: one synchronous request per batch takes every thread under LATENCY;
    # THROUGHPUT splits the threads into streams, and one request at a time leaves the others idle
    cfg = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = str(threads)
    compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
    request = compiled.create_infer_request()
    return lambda x: request.infer({"images": x})[compiled.output(0)].copy()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    bundle = Path(args.bundle)
    spec = json.loads((bundle / "spec.json").read_text())
    entry = spec["tasks"]["embed"]
    img = spec["image"]
    x = (
        np.random.default_rng(0)
        .standard_normal((args.batch, img["channels"], img["size"], img["size"]))
        .astype(np.float32)
    )
    base_fn = ort_runner(bundle / entry["file"], args.threads)
    ref = base_fn(x)
    rows: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = [("onnxruntime fp32", base_fn)]
    for kind, v in entry.get("variants", {}).items():
        rows.append((f"onnxruntime {kind}", ort_runner(bundle / v["file"], args.threads)))
    try:
        import openvino  # noqa: F401

        for prec in ("f32", "bf16"):
            rows.append((f"openvino {prec}", openvino_runner(bundle / entry["file"], prec, args.threads)))
    except ImportError:
        _logger.info("(openvino not installed: pip install openvino for its rows)")
    _logger.info("%s  embed  batch %d  %dx%d", spec["model"]["id"], args.batch, img["size"], img["size"])
    base = None
    for name, fn in rows:
        rate_ = rate(fn, x, args.seconds)
        base = base or rate_
        _logger.info(
            "%-18s %9.1f img/s  x%.2f vs ORT fp32  cos %.6f",
            name,
            rate_,
            rate_ / base,
            min_row_cosine(fn(x)[:, 0], ref[:, 0]),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
