"""LitServe baseline for ``bench/serve.py``: the bundle's embed graph behind LitServe's dynamic batching.

    python bench/litserve_server.py --model-dir models/default --port 8300 \\
        [--backend onnxruntime --precision int8]

``POST /embed`` takes the same payloads as the service (JSON ``{"images": ["<base64>"]}`` or a raw
image body), decodes and preprocesses with the service's own ``Preprocessor`` (the same pixels), batches
up to ``--max-batch`` requests waiting at most ``--batch-timeout-ms``, runs the graph through the
service's backend classes pinned to ``--backend``/``--precision`` (the same runtime and graph file as
the service), and answers ``{"embeddings": [[...]], "dim": D}`` (cls). LitServe is a benchmark-only
dependency (``pip install -e '.[bench]'``); this file is never part of the service. Binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


try:
    import litserve as ls
except ImportError:  # only ``--help`` works without it
    ls = None

_Base: Any = ls.LitAPI if ls is not None else object


class EmbedAPI(_Base):  # module level: LitServe pickles the API into its inference worker process
    def __init__(self, model_dir: Path, backend: str, precision: str, threads: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.model_dir, self.backend, self.precision, self.threads = model_dir, backend, precision, threads

    def setup(self, device: str) -> None:
        from service.backends import BackendOptions, select_backend
        from service.bundle import load_bundle
        from service.imaging import Limits, Preprocessor

        bundle = load_bundle(self.model_dir)
        self.pre = Preprocessor(bundle.image, Limits(max_pixels=50_000_000, min_side=1))
        self.be = select_backend(
            bundle, options=BackendOptions(device="cpu", threads=self.threads),
            pinned={"embed": (self.backend, self.precision)},
        ).backend  # fmt: skip

    def decode_request(self, request: dict) -> np.ndarray:  # type: ignore[type-arg]  # dict: the JSON body
        data = base64.b64decode(request["images"][0] if "images" in request else request["image"])
        return self.pre(data)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.be.infer("embed", {"images": x})[:, 0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return {"embeddings": [output.tolist()], "dim": int(output.shape[-1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    if ls is None:
        sys.stderr.write("litserve is not installed: pip install -e '.[bench]'\n")
        return 2
    api = EmbedAPI(args.model_dir, args.backend, args.precision, args.threads, max_batch_size=args.max_batch,
                   batch_timeout=args.batch_timeout_ms / 1000.0, api_path="/embed")  # fmt: skip
    server = ls.LitServer(
        api, accelerator="cpu", workers_per_device=1, timeout=30, healthcheck_path="/readyz"
    )
    server.run(host="127.0.0.1", port=args.port, log_level=args.log_level, generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
