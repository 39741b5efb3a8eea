"""CPU per ``POST /embed`` request spent by the service itself (no sockets, no model), fast path vs FastAPI.

    python bench/asgi_cost.py [--bundle models/default] [--requests 1000] [--rounds 3]

Builds the app on the bundle's embed graph with a null backend (zeros of the right shape, no inference),
then calls the ASGI app directly with a JSON base64 body of a 28x28 PNG: ``/embed`` (the fast path,
``service/fast.py``) and ``/embed?normalize=false`` (the same answer through FastAPI's dependency
solving and parameter validation), interleaved, ``time.process_time`` per request. What remains is
routing, middleware, JSON parsing, base64, inline decode + preprocess, batching hand-offs, pooling and
the JSON response.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def embed_only(bundle: Path, dst: Path) -> Path:
    """A copy of ``bundle`` with its embed task only (what the null backend serves)."""
    spec = json.loads((bundle / "spec.json").read_text())
    spec["tasks"] = {"embed": {k: v for k, v in spec["tasks"]["embed"].items() if k != "variants"}}
    keep = {spec["tasks"]["embed"]["file"], *(spec.get("external_data") or {})}  # + the shared weights
    spec["files"] = {k: v for k, v in spec["files"].items() if k in keep}
    for f in keep:
        shutil.copy(bundle / f, dst / f)
    (dst / "spec.json").write_text(json.dumps(spec))
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    from service.app import create_app
    from service.backends.base import Backend
    from service.settings import Settings

    class NullBackend(Backend):
        name = "null"

        def load(self, bundle: Any, precision: str = "fp32", tasks: Any = None) -> None:
            self.bundle, self.capabilities = bundle, frozenset(["embed"])

        def _zeros(self, n: int) -> list[np.ndarray]:
            outs = self.bundle.spec["tasks"]["embed"]["outputs"]
            return [np.zeros((n, *(int(d) for d in o["shape"][1:])), np.float32) for o in outs]

        def infer(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
            return self._zeros(len(inputs["images"]))[0]

        def infer_outputs(self, task: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            names = [o["name"] for o in self.bundle.spec["tasks"]["embed"]["outputs"]]
            return dict(zip(names, self._zeros(len(inputs["images"])), strict=True))

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    body = json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(model_dir=embed_only(args.bundle, Path(tmp))), backend=NullBackend())

        async def call(qs: bytes) -> int:
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/embed", "raw_path": b"/embed", "query_string": qs,
                     "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                     "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())]}  # fmt: skip
            done = False
            status = 0

            async def receive() -> dict[str, Any]:
                nonlocal done
                if not done:
                    done = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.sleep(3600)
                return {"type": "http.disconnect"}

            async def send(m: dict[str, Any]) -> None:
                nonlocal status
                if m["type"] == "http.response.start":
                    status = m["status"]

            await app(scope, receive, send)
            return status

        async def run() -> dict[str, list[float]]:
            res: dict[str, list[float]] = {"fast path (/embed)": [], "FastAPI (/embed?normalize=false)": []}
            async with app.router.lifespan_context(app):
                for qs in (b"", b"normalize=false"):
                    for _ in range(50):
                        assert await call(qs) == 200
                for _ in range(args.rounds):
                    for key, qs in zip(res, (b"", b"normalize=false"), strict=True):
                        t0 = time.process_time()
                        for _ in range(args.requests):
                            await call(qs)
                        res[key].append(1e3 * (time.process_time() - t0) / args.requests)
            return res

        res = asyncio.run(run())
    for key, values in res.items():
        sys.stdout.write(f"{key}: CPU ms per request " + ", ".join(f"{v:.3f}" for v in values) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
