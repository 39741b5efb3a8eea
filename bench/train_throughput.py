"""Pretraining throughput of a preset: images/s of full training steps (forward, alignment pass, backward,
AdamW), fp32 vs the preset's autocast precision measured in the same run, plus model FLOPs utilization
where a peak is known.

    python bench/train_throughput.py fmnist_cae [--batch 256] [--steps 5] [--set model.overrides.depth=8]
    python bench/train_throughput.py cae_base_800e --batch 64 --device cuda     # on a GPU
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.config import load_config  # noqa: E402
from training.engine import build_model, cpu_has_amx_or_bf16  # noqa: E402

_logger = logging.getLogger("bench")


def train_flops_per_image(model, mask_ratio: float) -> float:
    """Matmul FLOPs of one training step per image (2*MACs; backward = 2x forward on the grad path)."""
    c = model.cfg
    n = c.num_patches
    nm = int(round(mask_ratio * n))
    nv = n - nm

    def block(tokens: int, d: int, hidden: int, kv: int | None = None) -> float:
        kv = tokens if kv is None else kv
        proj = 2 * tokens * d * d * 4 + 2 * tokens * d * hidden * 2  # qkv+proj, mlp
        attn = 2 * 2 * tokens * kv * d
        return proj + attn

    enc = c.depth * block(1 + nv, c.embed_dim, int(c.embed_dim * c.mlp_ratio))
    target = c.depth * block(1 + nm, c.embed_dim, int(c.embed_dim * c.mlp_ratio))  # no backward
    dd = c.decoder_embed_dim
    reg = c.regressor_depth * block(nm, dd, int(dd * c.decoder_mlp_ratio), kv=n)
    dec = c.decoder_depth * block(nm, dd, int(dd * c.decoder_mlp_ratio)) + 2 * nm * dd * c.pred_dim
    return 3 * (enc + reg + dec) + target


def measure(model, batch: int, steps: int, device: torch.device, amp: torch.dtype | None, mask_ratio: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    c = model.cfg
    x = torch.randn(batch, c.in_chans, c.img_size, c.img_size, device=device)
    nm = int(round(mask_ratio * c.num_patches))
    mask = torch.zeros(batch, c.num_patches, dtype=torch.bool, device=device)
    mask[:, torch.randperm(c.num_patches)[:nm]] = True
    target = x if c.target == "pixel" else torch.randint(0, c.vocab_size, (batch, c.num_patches), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x, mask)
        model.forward_loss(out, target)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("preset")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (H100 SXM: 989)")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(args.preset, args.set)
    device = torch.device(args.device)
    model = build_model(cfg).to(device).train()
    if model.cfg.target == "dalle":
        _logger.info("(DALL-E targets: random token ids stand in for the tokenizer, which is not timed)")
    flops = train_flops_per_image(model, cfg.data.mask_ratio)
    low = torch.bfloat16 if device.type == "cuda" or cpu_has_amx_or_bf16() else None
    base = measure(model, args.batch, args.steps, device, None, cfg.data.mask_ratio)
    rows = [("fp32", base)]
    if low is not None:
        rows.append(("bf16 autocast", measure(model, args.batch, args.steps, device, low, cfg.data.mask_ratio)))
    _logger.info("%s on %s, batch %d, %.2f GFLOP/img per training step", args.preset, device, args.batch, flops / 1e9)
    for name, rate in rows:
        line = f"{name:14s} {rate:9.1f} img/s  x{rate / base:.2f} vs fp32  {rate * flops / 1e12:.2f} TFLOP/s"
        if args.peak_tflops:
            line += f"  MFU {100 * rate * flops / 1e12 / args.peak_tflops:.1f}%"
        _logger.info(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
