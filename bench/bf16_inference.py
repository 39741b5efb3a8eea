"""bf16 inference of a CAE encoder (default ViT-S/16 at 224) against this machine's matmul rates, one run.

    python bench/bf16_inference.py [--model cae_small_patch16_224] [--batch 32] [--seconds 4] [--threads 2]
                                   [--rounds 2] [--compile] [--onnx-dir DIR]

Prints, measured in the same process and interleaved over ``--rounds`` (best round kept: these machines
are noisy):

- the dense matmul rate (``bench/train_throughput.matmul_rate``: best of timed batches) in fp32 and bf16
  at 2048^3 and at the model's own projection shape (batch x tokens rows, D -> 4D), the reference the
  issue's ">= 60% of the bf16 matmul rate" is read against;
- the encoder's FLOPs per image, counted by ``torch.utils.flop_counter`` (every matmul, attention included);
- for each way to run the embed graph here: images/s, achieved GFLOP/s, that as a fraction of the bf16
  matmul rates, and the minimum cosine of the cls token to torch fp32 on the same images:
  torch fp32; torch bf16 autocast (the service's torch backend); torch bf16 with the weights cast once
  (LayerNorm kept in fp32); optionally each under ``torch.compile``; ONNX Runtime fp32 and OpenVINO
  fp32/bf16 on the exported graph (``--onnx-dir``: an exported bundle to reuse, else one is exported).

Random weights (seeded): the rates do not depend on them, and cosine to fp32 is a property of the
arithmetic. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.export_variants import openvino_runner, ort_runner, rate  # noqa: E402
from bench.train_throughput import matmul_rate  # noqa: E402
from service.bundle_format import min_row_cosine  # noqa: E402
from training.models import create_model  # noqa: E402

_logger = logging.getLogger("bench")

Runner = Callable[[np.ndarray], np.ndarray]


def encoder_flops(model: nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return float(counter.get_total_flops())


class Features(nn.Module):
    """The embed graph's first output (every token after the final norm), as the service serves it."""

    def __init__(self, cae: nn.Module) -> None:
        super().__init__()
        self.cae = cae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.cae.forward_features(images)


def cast_weights_bf16(model: nn.Module) -> nn.Module:
    """Linear and conv weights in bf16 once (no per-call cast); norms, tables and tokens stay fp32 so that
    LayerNorm statistics and the residual stream keep fp32 precision, as autocast does."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            m.to(torch.bfloat16)
    return model


class Bf16Weights(nn.Module):
    """Autocast around a model whose projection weights are bf16 already: autocast then has nothing to
    cast per call but the activations."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = cast_weights_bf16(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(images)


def torch_runner(model: nn.Module, autocast: bool) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(torch.from_numpy(x)).float().numpy()

    return run


def export_embed(model_name: str, seed: int, out_dir: Path) -> Path:
    from export.onnx_export import export_bundle
    from training.models import save_model

    torch.manual_seed(seed)
    model = create_model(model_name, target="pixel").eval()
    ckpt = save_model(model, out_dir / "model.safetensors")
    export_bundle(ckpt, out_dir / "bundle", tasks=("embed",))
    spec = json.loads((out_dir / "bundle" / "spec.json").read_text())
    return out_dir / "bundle" / spec["tasks"]["embed"]["file"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cae_small_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="also torch.compile the torch rows")
    p.add_argument("--onnx-dir", type=Path, default=None, help="reuse this exported bundle's embed graph")
    p.add_argument("--no-onnx", action="store_true", help="torch rows only")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    cae = create_model(args.model, target="pixel").eval()
    cfg = cae.cfg
    size, tokens, dim = cfg.img_size, (cfg.img_size // cfg.patch_size) ** 2 + 1, cfg.embed_dim
    flops = encoder_flops(Features(cae), size)
    x = np.random.default_rng(args.seed).standard_normal((args.batch, 3, size, size)).astype(np.float32)
    ref_model = Features(cae)
    ref = torch_runner(ref_model, autocast=False)(x)[:, 0]

    rows: dict[str, Runner] = {
        "torch fp32": torch_runner(ref_model, autocast=False),
        "torch bf16 autocast": torch_runner(copy.deepcopy(ref_model), autocast=True),
        "torch bf16 weights": torch_runner(Bf16Weights(copy.deepcopy(ref_model)), autocast=False),
    }
    if args.compile:
        for name, mod in (
            ("torch fp32 compiled", copy.deepcopy(ref_model)),
            ("torch bf16 weights compiled", Bf16Weights(copy.deepcopy(ref_model))),
        ):
            t0 = time.perf_counter()
            fn = torch_runner(torch.compile(mod), autocast=False)  # type: ignore[arg-type]
            fn(x)
            _logger.info("%s: compiled in %.1f s", name, time.perf_counter() - t0)
            rows[name] = fn
    with tempfile.TemporaryDirectory() as tmp:  # the exported graph lives until the measurement ends
        if not args.no_onnx:
            onnx = args.onnx_dir
            if onnx is None:
                onnx = export_embed(args.model, args.seed, Path(tmp))
            elif onnx.is_dir():
                spec = json.loads((onnx / "spec.json").read_text())
                onnx = onnx / spec["tasks"]["embed"]["file"]
            try:
                rows["onnxruntime fp32"] = ort_runner(onnx, args.threads)
            except ImportError:
                _logger.info("(onnxruntime not installed)")
            try:
                rows["openvino f32"] = openvino_runner(onnx, "f32", args.threads)
                rows["openvino bf16"] = openvino_runner(onnx, "bf16", args.threads)
            except ImportError:
                _logger.info("(openvino not installed)")
        return _measure(args, rows, x, ref, flops, tokens, dim)


def _measure(
    args: argparse.Namespace,
    rows: dict[str, Runner],
    x: np.ndarray,
    ref: np.ndarray,
    flops: float,
    tokens: int,
    dim: int,
) -> int:
    shapes = {"2048^3": (2048, 2048, 2048), "model": (args.batch * tokens, dim, 4 * dim)}
    cpu = torch.device("cpu")
    best: dict[str, float] = {}
    t_start = time.perf_counter()
    for r in range(args.rounds):  # interleaved: matmul rates and every runner in each round
        for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for shape_name, (m, k, n) in shapes.items():
                key = f"matmul {prec} {shape_name}"
                gflops = matmul_rate(m, k, n, dtype, cpu, args.seconds / 2) / 1e9
                best[key] = max(best.get(key, 0.0), gflops)
        for name, fn in rows.items():
            best[name] = max(best.get(name, 0.0), rate(fn, x, args.seconds))
        _logger.info("round %d/%d done (%.0f s)", r + 1, args.rounds, time.perf_counter() - t_start)
    cosines = {name: min_row_cosine(fn(x)[:, 0], ref) for name, fn in rows.items()}
    bf16_sq, bf16_model = best["matmul bf16 2048^3"], best["matmul bf16 model"]
    _logger.info(
        "%s, %d threads, batch %d: %.2f GFLOP/img; matmul fp32 %.0f / %.0f GFLOP/s, bf16 %.0f / %.0f GFLOP/s "
        "(2048^3 / model shape %dx%dx%d)",
        args.model, args.threads, args.batch, flops / 1e9, best["matmul fp32 2048^3"],
        best["matmul fp32 model"], bf16_sq, bf16_model, *shapes["model"],
    )  # fmt: skip
    _logger.info("| runtime | img/s | GFLOP/s | / bf16 matmul 2048^3 | / bf16 matmul model shape | cos |")
    _logger.info("|---|---:|---:|---:|---:|---:|")
    results = []
    for name in rows:
        gflops = best[name] * flops / 1e9
        results.append({"runtime": name, "img_s": best[name], "gflops": gflops, "cosine": cosines[name]})
        _logger.info(
            "| %s | %.1f | %.0f | %.2f | %.2f | %.6f |",
            name, best[name], gflops, gflops / bf16_sq, gflops / bf16_model, cosines[name],
        )  # fmt: skip
    if args.json:
        out = {
            "args": vars(args),
            "flops_per_img": flops,
            "matmul": {k: v for k, v in best.items() if k.startswith("matmul")},
            "rows": results,
        }
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
