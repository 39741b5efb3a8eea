"""The naive baseline for ``bench/serve.py``: a minimal FastAPI app that serves a bundle's embed graph
with ONE ONNX Runtime fp32 inference per request, no batching.

    python bench/naive_server.py --model-dir models/default --port 8100

What a first attempt would look like: ``POST /embed`` takes a raw image body (or the first image of a
JSON base64 body, the payload ``bench/serve.py`` sends every server), decodes it with PIL
(``convert("RGB")``, no draft mode), resizes with the spec's filter, normalizes with plain numpy
(``(x/255 - mean)/std``) and calls ``InferenceSession.run`` directly inside the ``async`` handler, so
requests are served strictly one at a time (no batching, no worker pool, no backpressure). It answers
``{"embeddings": [[...]], "dim": D}`` with the cls token, like the real server's default. Only the
fp32 graph named in ``spec.json`` is used; there are no checksums, limits or error handling to speak of:
this file is a benchmark baseline, never something to deploy. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

_logger = logging.getLogger("bench.naive_server")

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def load_embed(model_dir: Path, backend: str, precision: str, threads: int = 0) -> Any:
    """``infer(x) -> tokens`` on the bundle's embed graph: ONNX Runtime fp32 straight from the file by
    default, or any runtime/precision through the service's own backend classes (the same graph and
    runtime the service chose, for a comparison of serving alone)."""
    if backend == "onnxruntime" and precision == "fp32":
        import onnxruntime as ort

        spec = json.loads((model_dir / "spec.json").read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(
            str(model_dir / spec["tasks"]["embed"]["file"]), opts, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from service.backends import BackendOptions, select_backend
    from service.bundle import load_bundle

    be = select_backend(
        load_bundle(model_dir), options=BackendOptions(device="cpu", threads=threads),
        pinned={"embed": (backend, precision)},
    ).backend  # fmt: skip
    return lambda x: be.infer("embed", {"images": x})


def image_bytes(content_type: str, body: bytes) -> bytes:
    """A raw image body, or the first image of a JSON ``{"images": ["<base64>"]}`` / ``{"image": ...}``."""
    if content_type.startswith("application/json"):
        doc = json.loads(body)
        return base64.b64decode(doc["images"][0] if "images" in doc else doc["image"])
    return body


def create_app(
    model_dir: Path, threads: int = 0, backend: str = "onnxruntime", precision: str = "fp32"
) -> FastAPI:

    spec = json.loads((model_dir / "spec.json").read_text())
    image = spec["image"]
    size = int(image["size"])
    mode = "RGB" if int(image["channels"]) == 3 else "L"
    mean = np.asarray(image["mean"], dtype=np.float32)
    std = np.asarray(image["std"], dtype=np.float32)
    resample = _RESAMPLE[image.get("interpolation", "bicubic")]
    infer = load_embed(model_dir, backend, precision, threads)
    app = FastAPI(title="naive CAE embed server (benchmark baseline)")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/embed")
    async def embed(request: Request) -> JSONResponse:
        data = image_bytes(request.headers.get("content-type", ""), await request.body())
        try:
            img = Image.open(io.BytesIO(data)).convert(mode).resize((size, size), resample)
        except Exception as e:  # a baseline: just say it was not an image
            return JSONResponse({"error": f"cannot decode image: {type(e).__name__}"}, status_code=400)
        x = np.asarray(img, dtype=np.float32) / 255.0
        if x.ndim == 2:
            x = x[:, :, None]
        x = ((x - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
        tokens = infer(x)  # blocks the event loop: one request at a time
        cls = tokens[:, 0]
        return JSONResponse({"embeddings": cls.tolist(), "dim": int(cls.shape[-1])})

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True, help="bundle directory (spec.json + embed graph)")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--threads", type=int, default=0, help="runtime intra-op threads (0 = its default)")
    p.add_argument(
        "--backend", default="onnxruntime", help="runtime of the embed graph (service backend name)"
    )
    p.add_argument("--precision", default="fp32", help="graph precision (fp32, int8, bf16 ...)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true", help="no uvicorn access log line per request")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    app = create_app(args.model_dir, args.threads, args.backend, args.precision)
    _logger.info("naive server: %s on 127.0.0.1:%d", args.model_dir, args.port)
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, log_level=args.log_level, access_log=not args.no_access_log
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
