"""fp32 training step of our CAE vs the official Atten4Vis/CAE code at the same config, interleaved.

Both models are built from the same official checkpoint (fixture A by default: 64 px, 8 px patches, D=96,
depth 4, DALL-E vocabulary 8192), get the same images, masks (half the grid) and stand-in token targets,
and run full training steps: forward (with the alignment branch), the official loss (cross-entropy +
2 x MSE alignment), backward, gradient clip 3.0, AdamW. Each side uses its own code for all of it: the
official ``ContextAutoencoderViT`` (its alignment-encoder copy each step included) with the AdamW that its
``furnace.optim_factory.create_optimizer`` builds, our ``CAE`` with ``training.engine.build_optimizer``.
Rounds alternate A/B so drift on a noisy machine hits both; the ratio of medians is printed.

The official code is read from a checkout (never vendored here):

    git --git-dir=/work/.mirror/Atten4Vis+CAE/repo archive HEAD models furnace | tar -x -C /tmp/official_cae
    python bench/official_step.py --official-dir /tmp/official_cae [--batch 64] [--threads 2] [--compile]

Its one CUDA call (``tensor.cuda(device)`` in ``ContextAutoencoderViT.forward``) is redirected to
``tensor.to(device)`` while the official model runs, the same CPU shim the fixture was made with.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from training.config import load_config  # noqa: E402
from training.engine import build_optimizer, compile_blocks  # noqa: E402
from training.models import load_model  # noqa: E402

_logger = logging.getLogger("bench")
FIXTURE = ROOT.parent / "shared" / "fixtures" / "official-cae-a"
CLIP = 3.0
ALIGN_WEIGHT = 2.0


@contextlib.contextmanager
def cpu_cuda_shim() -> Iterator[None]:
    """``Tensor.cuda(device)`` -> ``Tensor.to(device)`` (the official forward's only device call)."""
    orig = torch.Tensor.cuda

    def to_device(
        self: torch.Tensor, device: Any = None, non_blocking: bool = False, **_: Any
    ) -> torch.Tensor:
        return self if device is None else self.to(device, non_blocking=non_blocking)

    torch.Tensor.cuda = to_device  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = orig  # type: ignore[method-assign]


def use_official_code(official_dir: Path) -> None:
    """Put the checkout first on the path. ``furnace.utils`` is replaced by an empty module: the pretraining
    model never calls it, and its imports (``torch._six``, tensorboardX, the DALL-E and CLIP packages) are
    gone from current torch or not installed here."""
    if str(official_dir) not in sys.path:
        sys.path.insert(0, str(official_dir))
    import furnace  # type: ignore[import-not-found]

    stub = types.ModuleType("furnace.utils")
    sys.modules["furnace.utils"] = stub
    furnace.utils = stub


def build_official(official_dir: Path, fixture: Path) -> nn.Module:
    use_official_code(official_dir)
    from models.modeling_cae import ContextAutoencoderViT  # type: ignore[import-not-found]

    cfg = json.loads((fixture / "config.json").read_text())
    kw = dict(cfg["constructor_kwargs"])
    kw.pop("extra_kwargs_ignored", None)
    if kw.pop("norm_layer", "").startswith("partial(nn.LayerNorm"):
        kw["norm_layer"] = partial(nn.LayerNorm, eps=1e-6)
    ns = argparse.Namespace(**cfg["args_fields_read_by_model"])
    model = ContextAutoencoderViT(**kw, args=ns)
    torch.serialization.add_safe_globals([argparse.Namespace])
    ck = torch.load(fixture / "official_pretrain_ckpt.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(ck["model"])
    return model


def official_optimizer(model: nn.Module, lr: float, wd: float) -> torch.optim.Optimizer:
    """What ``furnace.optim_factory.create_optimizer`` builds for ``--opt adamw`` (that module no longer
    imports with current timm): its two groups, no decay for 1-D tensors, biases and
    ``model.no_weight_decay()``, then a plain ``torch.optim.AdamW`` (torch's default implementation)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 or name.endswith(".bias") or name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, eps=1e-8, betas=(0.9, 0.999))


def official_step(model: nn.Module, opt: torch.optim.Optimizer, images, mask, labels) -> float:
    with cpu_cuda_shim():
        logits, latent_pred, latent_target = model(images, bool_masked_pos=mask)
    loss = F.cross_entropy(logits.float(), labels[mask]) + ALIGN_WEIGHT * F.mse_loss(
        latent_pred.float(), latent_target.detach().float()
    )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return float(loss.detach())


def our_step(model: nn.Module, core: Any, opt: torch.optim.Optimizer, images, mask, labels) -> float:
    out = model(images, mask, head=False)  # as train_one_epoch at fp32: head and cross-entropy fused
    loss = core.forward_loss(out, labels)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(core.parameters(), CLIP)
    opt.step()
    return float(loss.detach())


def time_steps(step: Callable[[], float], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--official-dir", type=Path, required=True, help="checkout of Atten4Vis/CAE (models/, furnace/)"
    )
    p.add_argument(
        "--fixture", type=Path, default=FIXTURE, help="an official checkpoint folder (config.json)"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time ours with compile_blocks")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (a.official_dir / "models" / "modeling_cae.py").is_file():
        p.error(f"{a.official_dir}: no models/modeling_cae.py (see the docstring for the checkout command)")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    official = build_official(a.official_dir, a.fixture).train()
    ours = load_model(a.fixture / "official_pretrain_ckpt.pth").train()
    cfg = load_config("cae_base_800e")  # the official recipe's AdamW settings
    o_opt = official_optimizer(official, cfg.optim.lr, cfg.optim.weight_decay)
    u_opt = build_optimizer(ours, cfg, torch.device("cpu"))
    c = ours.cfg
    n = c.num_patches
    images = torch.randn(a.batch, 3, c.img_size, c.img_size)
    mask = torch.zeros(a.batch, n, dtype=torch.bool)
    # half the grid, a different set per image (the official regressor needs equal counts per image)
    for i in range(a.batch):
        mask[i, torch.randperm(n, generator=torch.Generator().manual_seed(i))[: n // 2]] = True
    labels = torch.randint(0, c.vocab_size, (a.batch, n), generator=torch.Generator().manual_seed(1))
    sides: dict[str, Callable[[], float]] = {
        "official": lambda: official_step(official, o_opt, images, mask, labels),
        "ours": lambda: our_step(ours, ours, u_opt, images, mask, labels),
    }
    if a.compile:  # a copy with its blocks compiled in place (regional compilation), its own optimizer
        compiled = copy.deepcopy(ours)
        compile_blocks(compiled)
        c_opt = build_optimizer(compiled, cfg, torch.device("cpu"))
        sides["ours+compile_blocks"] = lambda: our_step(compiled, compiled, c_opt, images, mask, labels)
    # the same first loss: both sides compute the same model before any update
    first = {k: f() for k, f in sides.items()}
    for f in sides.values():  # warm-up
        f()
    secs: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(a.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for k in order:
            secs[k].append(time_steps(sides[k], a.steps))
    rate = {k: a.batch * a.steps / statistics.median(v) for k, v in secs.items()}
    report = {
        "config": {"img_size": c.img_size, "patch_size": c.patch_size, "embed_dim": c.embed_dim,
                   "depth": c.depth, "vocab_size": c.vocab_size},  # fmt: skip
        "batch": a.batch, "threads": torch.get_num_threads(), "steps": a.steps, "rounds": a.rounds,
        "first_loss": first, "img_per_s": rate,
        "ratio_vs_official": {k: rate[k] / rate["official"] for k in rate},
    }  # fmt: skip
    if a.json:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
    else:
        _logger.info("fixture config %s, batch %d, %d threads, fp32, %d interleaved rounds of %d steps",
                     report["config"], a.batch, report["threads"], a.rounds, a.steps)  # fmt: skip
        for k in sides:
            _logger.info("%-22s %8.1f img/s  x%.2f vs official  (first loss %.5f)", k, rate[k],
                         rate[k] / rate["official"], first[k])  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
