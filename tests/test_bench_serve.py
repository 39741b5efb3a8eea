"""Smoke test of ``bench/serve.py``: the real server, the naive server and the in-process runs against a
tiny bundle, at two small concurrency levels for one second each; the JSON report has every number."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
LEVEL_KEYS = {"concurrency", "seconds", "requests", "errors", "rps", "p50_ms", "p90_ms", "p99_ms", "mean_ms"}


@pytest.fixture(scope="module")
def embed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny embed-only bundle (32x32, 2 blocks): cheaper to export than the service tests' full one."""
    from export.onnx_export import export_bundle
    from tests.helpers import perturbed, tiny_overrides
    from training.models import CAEConfig, save_model

    root = tmp_path_factory.mktemp("bench-bundle")
    ckpt = save_model(perturbed(CAEConfig(**tiny_overrides(target="pixel"))), root / "tiny.safetensors")
    export_bundle(ckpt, root / "bundle", tasks=("embed",))
    return root / "bundle"


@pytest.mark.slow
def test_bench_serve_smoke(tmp_path: Path, embed_bundle: Path) -> None:
    bundle = embed_bundle
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "serve.py"), "--bundle", str(bundle),
        "--backend", "onnxruntime", "--precision", "fp32", "--duration", "1", "--warmup", "0.3",
        "--concurrency", "1,4", "--image", "photo", "--image-size", "48", "--max-batch", "4",
        "--start-timeout", "60", "--max-total-s", "100", "--json", str(out),
        "--load", "python", "--payload", "png", "--no-litserve", "--no-fastest",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| clients |" in r.stdout and "server / naive" in r.stdout

    doc = json.loads(out.read_text())
    assert doc["server"]["backend"] == "onnxruntime" and doc["server"]["precision"] == "fp32"
    assert doc["server"]["max_batch"] == 4
    for who in ("server", "naive"):
        levels = doc[who]["levels"]
        assert [lv["concurrency"] for lv in levels] == [1, 4]
        for lv in levels:
            assert LEVEL_KEYS <= lv.keys()
            assert lv["requests"] > 0 and lv["errors"] == {}, (who, lv)
            assert lv["rps"] > 0 and 0 < lv["p50_ms"] <= lv["p99_ms"]
    for lv in doc["server"]["levels"]:  # from the server's /metrics
        assert lv["server_stats"]["mean_batch"] >= 1 and lv["server_stats"]["inference_mean_ms"] > 0
    ip = doc["inprocess"]
    assert ip["backend"] == "onnxruntime" and ip["max_batch"] == 4
    for key in ("batched_img_per_s", "batch1_p50_ms", "batch1_img_per_s", "preprocess_p50_ms"):
        assert ip[key] > 0 and math.isfinite(ip[key]), key
    t = doc["targets"]
    assert t["high_concurrency"] == 4 and t["low_concurrency"] == 1
    for key in ("server_vs_inprocess", "server_vs_naive", "p50_gap_ms"):
        assert math.isfinite(t[key]["value"]), key
    for key in ("server_vs_inprocess", "p50_gap_ms"):
        assert isinstance(t[key]["met"], bool), key
    assert t["server_vs_naive"]["met"] is None  # reported, not judged: the issue sets no naive goal
    assert doc["settings"]["torch_imported"] is False  # the benchmark itself never needs torch


WRK_OUTPUT = """Running 8s test @ http://127.0.0.1:8200/embed
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   119.92ms   21.40ms 313.52ms   87.50%
    Req/Sec   240.12     40.01   303.00     70.00%
  Latency Distribution
     50%  118.75ms
     75%  124.21ms
     90%  139.02ms
     99%  212.00ms
  1920 requests in 8.04s, 3.32MB read
  Non-2xx or 3xx responses: 3
  Socket errors: connect 0, read 1, write 0, timeout 2
Requests/sec:    238.68
Transfer/sec:    423.41KB
"""


def test_wrk_report_parsing() -> None:
    sys.path.insert(0, str(REPO))
    from bench.serving.wrk import parse

    r = parse(WRK_OUTPUT, 32, 8.04)
    assert (r.requests, r.rps, r.concurrency) == (1920, 238.68, 32)
    assert (r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms) == (118.75, 139.02, 212.0, 313.52)
    assert r.mean_ms == 119.92 and r.errors == {"non-2xx": 3, "read": 1, "timeout": 2}


def test_serve_benchmark_files_stay_small() -> None:
    """bench/serve.py was split by concern (bench/serving/): every file under 500 lines."""
    for f in [REPO / "bench" / "serve.py", *(REPO / "bench" / "serving").glob("*.py")]:
        assert len(f.read_text().splitlines()) < 500, f
