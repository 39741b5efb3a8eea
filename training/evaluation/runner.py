"""``run_eval``: one protocol end to end, from its parameters to a JSON-serializable result.

Parameters, dataset, device, backbone, cached features, the head, the budget check and the raw-pixel
baseline, in that order.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .. import data as D
from ..files import write_json_atomic
from ..models import parse_readout, readout_dim
from ..runtime import auto_threads, cpu_threads, resolve_device, resolve_precision
from .attentive import run_attentive
from .backbone import Backbone, pixel_backbone, resolve_backbone
from .features import DEFAULT_CACHE_DIR, DataSpec, Split, get_features, parse_dataset, token_blocks
from .finetune import run_finetune
from .knn import run_knn
from .linear import run_linear
from .params import PROTOCOLS, CommonParams, EvalError, parse_overrides

__all__ = ["run_eval"]

_logger = logging.getLogger("training.evaluation")


def _dispatch(
    protocol: str,
    params: CommonParams,
    backbone: Backbone,
    spec: DataSpec,
    transform: D.EvalTransform,
    preprocess: dict[str, Any],
    dev: torch.device,
    amp: torch.dtype | None,
    seed: int,
    cache: Path,
    output_dir: Path | None = None,
    resume: bool = False,
) -> tuple[dict[str, Any], bool | None, int, int, int]:
    """Run one protocol: (result fields, features came from the cache, n_train, n_test, classes)."""
    if protocol == "finetune":
        res = run_finetune(
            params,  # type: ignore[arg-type]
            backbone,
            spec,
            transform,
            preprocess,
            dev,
            amp,
            seed,
            output_dir,
            resume,
        )
        return res, None, res.pop("n_train"), res.pop("n_test"), res.pop("num_classes")
    feature = getattr(params, "feature", None)
    # one encoder pass gives every standard readout for little more than the cls token: cache them
    # together, so that comparing readouts costs one extraction (lastN only as asked, and last4)
    readouts = [feature] if feature else []
    if protocol in ("knn", "linear"):
        readouts = list(dict.fromkeys([*readouts, "mean", "cls+mean", f"last{min(4, backbone.cfg.depth)}"]))
    tokens = getattr(params, "tokens", None) if protocol == "attentive" else None  # resolved by run_eval
    args = (params, transform, preprocess, amp, dev, cache)
    tr = get_features(backbone, spec, "train", tokens, readouts, *args)
    te = get_features(backbone, spec, "test", tokens, readouts, *args)
    if tr.classes and te.classes and tr.classes != te.classes:
        raise EvalError(f"train and test splits have different classes: {tr.classes[:5]} vs {te.classes[:5]}")
    nc = max(tr.num_classes, te.num_classes)
    t_head = time.perf_counter()

    def head(p: CommonParams, a: Split, b: Split) -> dict[str, Any]:
        if protocol == "knn":
            return run_knn(p, a, b, nc, dev)  # type: ignore[arg-type]
        if protocol == "linear":
            with cpu_threads(dev, 1):  # a [B, D] x [D, C] head: nothing to parallelize
                return run_linear(p, a, b, nc, dev, seed)  # type: ignore[arg-type]
        return run_attentive(p, a, b, nc, backbone.cfg.num_heads, dev, amp, seed)  # type: ignore[arg-type]

    res = head(params, tr, te)
    if getattr(params, "budget_check", False):
        more = {"epochs": 2 * params.epochs}  # type: ignore[attr-defined]
        if hasattr(params, "max_iter"):
            more["max_iter"] = 2 * params.max_iter
        doubled = dataclasses.replace(params, **more)  # type: ignore[arg-type]
        res2 = head(doubled, tr, te)
        res["budget_2x"] = {
            **more,
            "top1": res2["top1"],
            "top5": res2["top5"],
            "delta_top1": round(res2["top1"] - res["top1"], 4),
        }
    if getattr(params, "baseline", False):
        pix = pixel_backbone(backbone)
        ptr = get_features(pix, spec, "train", None, [], *args)
        pte = get_features(pix, spec, "test", None, [], *args)
        pparams = dataclasses.replace(params, feature="cls")  # type: ignore[call-arg]
        base = head(pparams, ptr, pte)
        res["baseline_pixels"] = {
            "top1": base["top1"],
            "top5": base["top5"],
            "feature_dim": int(ptr.features["cls"].shape[1]),
        }
    _logger.info("%s head: %.1f s", protocol, time.perf_counter() - t_head)
    return res, tr.cached and te.cached, len(tr.features["labels"]), len(te.features["labels"]), nc


def run_eval(
    checkpoint: str,
    protocol: str,
    dataset: str = "fashion-mnist",
    overrides: list[str] | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    device: str = "auto",
    output_dir: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Evaluate an encoder with one protocol; returns a JSON-serializable dict (``top1``/``top5`` in %).

    ``checkpoint``: a file :func:`load_model` reads, or ``random:PRESET_OR_MODEL`` (random init, seeded).
    ``protocol``: knn | linear | attentive | finetune. ``dataset``: fashion-mnist (train -> test) or
    imagefolder:PATH (PATH/train -> PATH/val). ``overrides``: ``key=value`` hyper-parameters (see
    :func:`allowed_overrides`). Deterministic given ``seed`` for a given device, precision and CPU
    thread count (``threads`` is picked from the load average unless set: pin it to compare runs bitwise).
    ``output_dir``: where ``result.json`` goes (and, for finetune, the per-epoch checkpoint, metrics and
    PNGs); ``resume``: continue the fine-tuning run checkpointed there.
    """
    t0 = time.perf_counter()
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    if resume and (protocol != "finetune" or output_dir is None):
        raise EvalError("resume continues a fine-tuning run: it needs protocol finetune and an output_dir")
    out = Path(output_dir) if output_dir is not None else None
    params = parse_overrides(protocol, overrides)
    spec = parse_dataset(dataset)
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise EvalError(str(e)) from e
    amp = resolve_precision(params.precision, dev)
    backbone = resolve_backbone(checkpoint, seed)
    if hasattr(params, "feature"):
        if params.feature is None:  # what /embed serves by default for this checkpoint
            params.feature = backbone.readout or "cls"
        try:
            parse_readout(params.feature, backbone.cfg.depth)
        except ValueError as e:
            raise EvalError(
                f"feature must be a readout of this {backbone.cfg.depth}-block encoder: {e}"
            ) from e
    if hasattr(params, "tokens") and params.tokens is None:
        # the blocks the checkpoint's default readout reads (last4 -> the last 4 blocks' tokens), else final
        kind, n = parse_readout(backbone.readout or "cls", backbone.cfg.depth)
        params.tokens = f"last{n}" if kind == "last" else "final"
    if hasattr(params, "tokens"):
        token_blocks(params.tokens, backbone.cfg.depth)  # a bad value fails before any extraction
    crop_pct = params.crop_pct if params.crop_pct is not None else spec.default_crop_pct
    preprocess = {**backbone.preprocess, "crop_pct": crop_pct}
    if preprocess["interpolation"] != "bicubic":
        _logger.warning(
            "checkpoint asks for %s resizing; evaluation resizes bicubically", preprocess["interpolation"]
        )
    transform = D.EvalTransform(
        backbone.cfg.img_size, preprocess["mean"], preprocess["std"], crop_pct=crop_pct
    )
    cache = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR.expanduser()
    _logger.info(
        "eval %s on %s with %s (%s, %s)", protocol, spec.dataset, checkpoint, dev, "bf16" if amp else "fp32"
    )

    threads = auto_threads(params.threads) if dev.type == "cpu" else None
    with cpu_threads(dev, threads):
        res, cached, n_train, n_test, nc = _dispatch(
            protocol, params, backbone, spec, transform, preprocess, dev, amp, seed, cache, out, resume
        )
    hp = dataclasses.asdict(params)
    hp["crop_pct"] = crop_pct
    hp["threads"] = threads
    if "warmup_epochs" in hp:
        hp["warmup_epochs"] = hp["warmup_epochs"] if hp["warmup_epochs"] < hp["epochs"] else hp["epochs"] / 10
    if "lr" in res:
        hp["lr"] = res.pop("lr")  # the linear probe's batch-scaled lr
    result = {
        "protocol": protocol,
        "checkpoint": checkpoint,
        "dataset": spec.dataset,
        "top1": res["top1"],
        "top5": res["top5"],
        "train_loss": res["train_loss"],
        "n_train": int(n_train),
        "n_test": int(n_test),
        "num_classes": int(nc),
        "feature": getattr(params, "feature", None),
        "feature_dim": int(readout_dim(params.feature, backbone.cfg.embed_dim, backbone.cfg.depth))
        if getattr(params, "feature", None)
        else int(backbone.cfg.embed_dim),
        **{k: res[k] for k in ("baseline_pixels", "budget_2x", "curve", "resumed_at_epoch") if k in res},
        "seed": seed,
        "device": str(dev),
        "precision": "bf16" if amp is not None else "fp32",
        "features_cached": cached,
        "preprocess": preprocess,
        "params": hp,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _logger.info(
        "%s top1 %.2f top5 %.2f (%d train / %d test, %.1f s)",
        protocol,
        result["top1"],
        result["top5"],
        n_train,
        n_test,
        result["seconds"],
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "result.json", result)
    if "baseline_pixels" in result:
        _logger.info(
            "%s on raw pixels (same code and split): top1 %.2f", protocol, result["baseline_pixels"]["top1"]
        )
    if "budget_2x" in result:
        b2 = result["budget_2x"]
        _logger.info(
            "%s with twice the epochs (%d): top1 %.2f (%+.2f)",
            protocol,
            b2["epochs"],
            b2["top1"],
            b2["delta_top1"],
        )
    return result
