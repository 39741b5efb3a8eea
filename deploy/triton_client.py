"""Send one image to a Triton server running ``python -m export triton`` output; print the embedding shape.

    python deploy/triton_client.py shirt.png [--url localhost:8001] [--model cae_embed] \\
        [--bundle models/default]

The image is decoded and preprocessed by the service's own ``Preprocessor`` with the bundle's
``spec.json`` (the same file Triton's model directory carries), so Triton sees exactly the tensor
``POST /embed`` would feed the graph; the cls token of the output is ``/embed``'s default embedding.
Needs ``tritonclient[grpc]`` (in the ``export`` extra) and the ``serve`` extra; no torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from service.bundle import load_bundle  # noqa: E402
from service.imaging import Limits, Preprocessor, configure_pillow  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR, Settings  # noqa: E402

_logger = logging.getLogger("triton_client")


def preprocess(data: bytes, bundle_dir: str | Path, label: str = "image") -> tuple[np.ndarray, dict]:
    """The service's preprocessing -> float32 [1, C, S, S], and the embed task's spec entry."""
    # only spec.json is read: the graphs (and their weights.bin) live in Triton's version folders
    bundle = load_bundle(bundle_dir, verify=False, spec_only=True)
    s = Settings()
    configure_pillow(s.max_pixels)
    x = Preprocessor(bundle.image, Limits(s.max_pixels, s.min_side))(data, label)
    return x[None], bundle.spec["tasks"]["embed"]


def infer(url: str, model: str, x: np.ndarray, task: dict, timeout_s: float = 30.0) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=url)
    if not client.is_model_ready(model):
        raise RuntimeError(f"model {model!r} is not ready on {url}")
    (inp,) = task["inputs"]
    (out,) = task["outputs"]
    request = grpcclient.InferInput(inp["name"], list(x.shape), "FP32")
    request.set_data_from_numpy(x.astype(np.float32, copy=False))
    result = client.infer(
        model, [request], outputs=[grpcclient.InferRequestedOutput(out["name"])], client_timeout=timeout_s
    )
    return result.as_numpy(out["name"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", type=Path)
    p.add_argument("--url", default="localhost:8001", help="Triton's gRPC endpoint")
    p.add_argument("--model", default="cae_embed", help="the Triton model name (<prefix>_embed)")
    p.add_argument(
        "--bundle", default=str(DEFAULT_MODEL_DIR), help="bundle (or Triton model dir) with spec.json"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    x, task = preprocess(args.image.read_bytes(), args.bundle, str(args.image))
    tokens = infer(args.url, args.model, x, task)
    embedding = tokens[:, 0]  # the cls token after the final norm: /embed's default (pooling=cls)
    _logger.info("tokens %s -> embedding %s", list(tokens.shape), list(embedding.shape))
    sys.stdout.write(
        json.dumps({"tokens_shape": list(tokens.shape), "embedding_shape": list(embedding.shape)}) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
