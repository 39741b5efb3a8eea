"""Pretraining throughput of a preset: images/s of full training steps (forward, alignment pass, backward,
AdamW, and the instance term when the preset has one), fp32 vs the preset's autocast precision, beside
this machine's dense matmul rate in the same precisions measured in the same run (square GEMMs, and GEMMs
of the model's own width), so the step's FLOP/s reads as a fraction of what the hardware gives here.

    python bench/train_throughput.py fmnist_cae [--batch 256] [--steps 5] [--set model.overrides.depth=8]
    python bench/train_throughput.py fmnist_cae_ct --batch 256 --threads 1
    python bench/train_throughput.py fmnist_cae --batch 256 --compare-attention --compile   # CPU variants
    python bench/train_throughput.py cae_base_800e --batch 64 --device cuda     # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.config import load_config  # noqa: E402
from training.engine import build_model, build_optimizer, compile_blocks, cpu_has_amx_or_bf16  # noqa: E402

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


def instance_flops_per_image(model, hidden: int, proj: int, pooling: str = "cls") -> float:
    """The instance term: one unmasked encoder pass on the second view (forward + backward) and the
    projection head on both views (its input is the pooling's readout: 2*N*D wide for lastN)."""
    from training.models.cae import readout_dim

    c = model.cfg
    d, t = c.embed_dim, 1 + c.num_patches
    block = 2 * t * d * d * 4 + 2 * t * d * int(d * c.mlp_ratio) * 2 + 2 * 2 * t * t * d
    width = readout_dim(pooling, d, c.depth)
    head = 2 * (width * hidden + hidden * hidden + hidden * proj)
    return 3 * (c.depth * block + 2 * head)


def matmul_rate(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seconds: float = 1.0
) -> float:
    """Achieved FLOP/s of [m, k] x [k, n] in ``dtype`` (best of repeated timed batches)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    best, reps = 0.0, 4
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        best = max(best, 2 * m * k * n * reps / dt)
        reps = reps * 2 if dt < 0.05 else reps
    return best


def measure(
    model, batch: int, steps: int, device: torch.device, amp: torch.dtype | None, mask_ratio: float, cfg=None
) -> float:
    from training.instance import build_instance_head, info_nce, instance_readout_blocks, masked_view_feature

    head, keep = None, 0
    if cfg is not None and cfg.instance.kind != "none":  # the preset's own term (its pooling, head width)
        ic = cfg.instance
        head = build_instance_head(model, ic.pooling, ic.hidden_dim, ic.proj_dim).to(device)
        keep = instance_readout_blocks(ic.pooling, model.cfg.depth)
    # the training's own optimizer (fused AdamW, its parameter groups) when the config is given
    opt = (
        build_optimizer(model, cfg, device, extra=head)
        if cfg is not None
        else torch.optim.AdamW(model.parameters(), lr=1e-4)
    )
    c = model.cfg
    x = torch.randn(batch, c.in_chans, c.img_size, c.img_size, device=device)
    nm = int(round(mask_ratio * c.num_patches))
    mask = torch.zeros(batch, c.num_patches, dtype=torch.bool, device=device)
    mask[:, torch.randperm(c.num_patches)[:nm]] = True
    target = (
        x if c.target == "pixel" else torch.randint(0, c.vocab_size, (batch, c.num_patches), device=device)
    )

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x, mask, keep_blocks=keep)
        loss = model.forward_loss(out, target)["loss"]
        if head is not None:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                z1 = head(masked_view_feature(out, model, cfg.instance.pooling))
                z2 = head(model.forward_readout(x.flip(-1), cfg.instance.pooling))
            loss = loss + info_nce(z1, z2, cfg.instance.temperature)[0]
        loss.backward()
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
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--set", action="append", default=[])
    p.add_argument(
        "--compare-attention", action="store_true",
        help="CPU: also time each precision with torch's fused SDPA kernel instead of the explicit "
        "attention the models use on the CPU (training.models.layers.CPU_ATTENTION), interleaved",
    )  # fmt: skip
    p.add_argument("--compile", action="store_true", help="also time the step with runtime.compile's blocks")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, [*args.set, "model.init_from=null"])
    device = torch.device(args.device)
    model = build_model(cfg).to(device).train()
    if model.cfg.target == "dalle":
        _logger.info("(DALL-E targets: random token ids stand in for the tokenizer, which is not timed)")
    flops = train_flops_per_image(model, cfg.data.mask_ratio)
    if cfg.instance.kind != "none":
        ic = cfg.instance
        flops += instance_flops_per_image(model, ic.hidden_dim, ic.proj_dim, ic.pooling)
    low = torch.bfloat16 if device.type == "cuda" or cpu_has_amx_or_bf16() else None
    d, tokens = model.cfg.embed_dim, args.batch * (1 + model.cfg.num_patches // 2)
    peaks = {}  # the hardware's dense rate here, measured now: square and model-shaped (tokens x D x 4D)
    for name, dt in (("fp32", torch.float32), *((("bf16", low),) if low is not None else ())):
        peaks[name] = (matmul_rate(2048, 2048, 2048, dt, device), matmul_rate(tokens, d, 4 * d, dt, device))
    from training.models import layers

    precisions = [("fp32", "fp32", None), *((("bf16 autocast", "bf16", low),) if low is not None else ())]
    compare = args.compare_attention and device.type == "cpu"
    kinds = ["explicit", "sdpa"] if compare else [layers.CPU_ATTENTION]
    variants = [(kind, model) for kind in kinds]
    if args.compile:  # a copy with every block compiled, as runtime.compile trains (compiled in warm-up)
        compiled = copy.deepcopy(model)
        compile_blocks(compiled)
        variants.append(("compiled", compiled))
        # and the whole forward compiled as one graph (masking gathers, embedding, heads fused too)
        variants.append(("compiled-model", torch.compile(copy.deepcopy(model))))
    rows = []
    for name, prec, dt in precisions:
        for kind, m in variants:  # interleaved: the variants of one precision back to back
            layers.CPU_ATTENTION = "sdpa" if kind == "sdpa" else "explicit"
            label = f"{name} [{kind}]" if len(variants) > 1 else name
            rate = measure(m, args.batch, args.steps, device, dt, cfg.data.mask_ratio, cfg)
            rows.append((label, prec, rate))
    layers.CPU_ATTENTION = "explicit"
    base = rows[0][2]
    _logger.info("%s on %s (%d threads), batch %d, %.2f GFLOP/img per training step", args.preset, device,
                 torch.get_num_threads(), args.batch, flops / 1e9)  # fmt: skip
    for name, (sq, shaped) in peaks.items():
        _logger.info(
            "matmul %-4s  2048^3 %7.1f GFLOP/s   %dx%dx%d (model-shaped) %7.1f GFLOP/s",
            name,
            sq / 1e9,
            tokens,
            d,
            4 * d,
            shaped / 1e9,
        )
    for name, prec, rate in rows:
        achieved = rate * flops
        sq, shaped = peaks[prec]
        line = (
            f"{name:25s} {rate:9.1f} img/s  x{rate / base:.2f} vs fp32  {achieved / 1e9:8.1f} GFLOP/s = "
            f"{100 * achieved / sq:.0f}% of the {prec} matmul rate "
            f"({100 * achieved / shaped:.0f}% of model-shaped)"
        )
        if args.peak_tflops:
            line += f"  MFU {100 * achieved / 1e12 / args.peak_tflops:.1f}%"
        _logger.info(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
