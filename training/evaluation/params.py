"""The protocols' hyper-parameters: one dataclass each, filled from ``key=value`` overrides and checked."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from ..config import yaml_number
from ..models import parse_readout

__all__ = [
    "PROTOCOLS",
    "AttentiveParams",
    "CommonParams",
    "EvalError",
    "FinetuneParams",
    "KnnParams",
    "LinearParams",
    "allowed_overrides",
    "parse_overrides",
]

PROTOCOLS = ("knn", "linear", "attentive", "finetune")


class EvalError(ValueError):
    """A user-facing evaluation problem (checkpoint, protocol, dataset, override); the message says which."""


@dataclass
class CommonParams:
    extract_batch_size: int = 128
    num_workers: int = 0  # the default machine has 2 busy cores: decode in the main process
    limit_train: int | None = None  # a fixed (seed-independent) random subset of N training images
    limit_test: int | None = None
    crop_pct: float | None = None  # None: 0.875 for imagefolder (official 224/256), 1.0 for fashion-mnist
    precision: str = "auto"  # auto (bf16 on AMX/avx512_bf16 CPUs and bf16 GPUs) | bf16 | fp32
    threads: int | None = None  # CPU threads; None: the cores the load average leaves idle (>= 1)


@dataclass
class KnnParams(CommonParams):
    # cls (official: the cls token after the final norm) | mean (mean of the patch tokens after the final
    # norm) | cls+mean (both, concatenated) | lastN (DINOv2: cls and mean of each of the last N blocks);
    # None: the checkpoint's default readout (what /embed serves by default), else cls
    feature: str | None = None
    baseline: bool = True  # also run the same protocol on raw pixels, printed beside the result
    k: int = 20
    temperature: float = 0.07
    chunk_size: int = 1024


@dataclass
class LinearParams(CommonParams):
    feature: str | None = None  # as KnnParams.feature; cls is the official linear-probe feature
    baseline: bool = True  # also run the same protocol on raw pixels
    budget_check: bool = True  # also train with twice the budget: shows whether the probe has converged
    # lbfgs: multinomial logistic regression on standardized features (BN without affine, frozen at the
    # train statistics), full batch, L-BFGS to convergence: a convex problem, so the result does not move
    # with the budget. lars: the official recipe (BN + linear, LARS, epochs below), which on small data
    # stops short of convergence (budget_check shows by how much)
    solver: str = "lbfgs"
    max_iter: int = 500  # lbfgs iterations
    l2: float = 1e-4  # lbfgs: L2 on the weights (on the mean loss), keeps the optimum finite
    epochs: int = 100
    batch_size: int = 1024
    # lr = base_lr x batch / 256 as officially, but base 1.0, not 0.1: LARS (trust 0.001) moves the weights
    # by relative steps, and 0.1 is sized for ~7000 steps of batch 16384, while small data gives a few
    # hundred steps, which 0.1 leaves underfit (an order of magnitude more diverges)
    base_lr: float = 1.0
    warmup_epochs: float = 10
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001


@dataclass
class AttentiveParams(CommonParams):
    # converged: on the held-out val split 10 / 20 / 40 / 80 epochs gave 89.31 / 89.78 / 90.02 / 90.00
    epochs: int = 40
    # the tokens attended over: final (every token after the final norm, official) | lastN (each of the
    # last N blocks' tokens through the final norm, concatenated on channels: the probe sees [1+Np, N*D],
    # as DINOv2's linear probe concatenates blocks); None: the blocks of the checkpoint's default readout
    # (lastN -> lastN, cls/mean -> final). On the held-out val split, shipped model, 20 epochs: last4
    # 90.35 vs final 89.78
    tokens: str | None = None
    budget_check: bool = False  # also train with twice the epochs (doubles the cost): shows convergence
    batch_size: int = 256
    # absolute, not scaled by batch: the official 0.4 is for batch 8192 and is unstable at 256, where
    # anything from 0.03 to 0.1 trains alike
    lr: float = 0.1
    min_lr: float = 1e-6
    warmup_epochs: float = 1
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class FinetuneParams(CommonParams):
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3  # absolute (official base: 8e-3 at batch 4096 for 100 epochs)
    min_lr: float = 1e-6
    warmup_epochs: float = 0.5
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off (official 0.8)
    cutmix: float = 0.0  # Beta(alpha, alpha); 0 = off (official 1.0)
    crop_padding: int | None = None  # random-crop padding in pixels; None: img_size // 8
    hflip: float = 0.5
    # random erasing (timm's RandomErasing, 'pixel' mode: per-pixel N(0, 1) in normalized space, area
    # 0.02-1/3, aspect 0.3-3.3), per image, before mixup/cutmix; 0 = off (official 0.25)
    reprob: float = 0.0
    rel_pos_bias: bool = True  # official fine-tuning adds a zero-initialized per-block table
    log_every: int = 50
    eval_every: int = 1  # test top-1 after every N epochs (the curve); 0: after the last only


_PARAM_CLASSES: dict[str, type[CommonParams]] = {
    "knn": KnnParams,
    "linear": LinearParams,
    "attentive": AttentiveParams,
    "finetune": FinetuneParams,
}


def allowed_overrides(protocol: str) -> list[str]:
    """The ``key=value`` keys a protocol accepts."""
    if protocol not in _PARAM_CLASSES:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    return sorted(f.name for f in dataclasses.fields(_PARAM_CLASSES[protocol]))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    args = typing.get_args(tp)
    if args and type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is float:
        value = yaml_number(value)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or tp is str
    )
    if not ok:
        raise EvalError(f"--set {key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return float(value) if tp is float else str(value) if tp is str else value


def parse_overrides(protocol: str, overrides: Sequence[str] | None) -> CommonParams:
    """``["epochs=5", "lr=0.1"]`` -> the protocol's parameter dataclass (values parsed as YAML)."""
    cls = _PARAM_CLASSES.get(protocol)
    if cls is None:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise EvalError(f"--set expects key=value, got {item!r}")
        if key not in hints:
            raise EvalError(
                f"unknown {protocol} parameter {key!r}; allowed: {', '.join(allowed_overrides(protocol))}"
            )
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise EvalError(f"--set {item!r}: unreadable value ({e})") from e
        values[key] = _coerce(key, value, hints[key])
    params = cls(**values)
    _validate_params(params)
    return params


def _validate_params(p: CommonParams) -> None:
    problems = []
    for name in ("extract_batch_size", "epochs", "batch_size", "k", "chunk_size", "log_every"):
        if hasattr(p, name) and getattr(p, name) < 1:
            problems.append(f"{name} must be >= 1")
    for name in ("limit_train", "limit_test"):
        if getattr(p, name) is not None and getattr(p, name) < 1:
            problems.append(f"{name} must be >= 1 (or null)")
    if p.threads is not None and p.threads < 1:
        problems.append("threads must be >= 1 (or null)")
    if p.num_workers < 0:
        problems.append("num_workers must be >= 0")
    if p.crop_pct is not None and not 0 < p.crop_pct <= 1:
        problems.append("crop_pct must be in (0, 1]")
    if p.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"precision must be auto|bf16|fp32, got {p.precision!r}")
    for name in ("lr", "base_lr", "temperature"):
        if hasattr(p, name) and getattr(p, name) <= 0:
            problems.append(f"{name} must be > 0")
    feature = getattr(p, "feature", None)
    if feature is not None:
        try:
            parse_readout(feature, 10**6)  # the depth bound is checked once the checkpoint is known
        except ValueError:
            problems.append(f"feature must be cls, mean, cls+mean or lastN (e.g. last4), got {feature!r}")
    if isinstance(p, LinearParams) and (p.solver not in ("lbfgs", "lars") or p.max_iter < 1 or p.l2 < 0):
        problems.append(f"solver must be lbfgs or lars (got {p.solver!r}), max_iter >= 1, l2 >= 0")
    if isinstance(p, FinetuneParams) and not 0 < p.layer_decay <= 1:
        problems.append("layer_decay must be in (0, 1]")
    if isinstance(p, FinetuneParams) and p.eval_every < 0:
        problems.append("eval_every must be >= 0")
    if isinstance(p, FinetuneParams):
        for name in ("reprob", "hflip"):
            if not 0 <= getattr(p, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(p, name)}")
    if problems:
        raise EvalError("invalid parameters: " + "; ".join(problems))
