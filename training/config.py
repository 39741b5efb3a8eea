"""Typed run configs: dataclasses, YAML presets (``training/configs/NAME.yaml``), ``--set a.b=value``.

A preset is a YAML mapping with the same nesting as :class:`PretrainConfig`; unknown keys are errors,
values are checked against the field types. The resolved config is written next to and inside every
checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A bad preset name, key or value; the message names it and what is allowed."""


@dataclass
class ModelSection:
    name: str = "cae_base_patch16_224"
    # any CAEConfig field (img_size, embed_dim, depth, target, decoder_embed_dim, ...)
    overrides: dict[str, Any] = field(default_factory=dict)
    # start from these weights (one of our .safetensors with the same architecture), e.g. a contrastive
    # tuning stage after CAE pretraining; None: the official random init
    init_from: str | None = None


@dataclass
class DataSection:
    dataset: str = "imagefolder:/path/to/imagenet"  # fashion-mnist | imagefolder:PATH | webdataset:SHARDS
    num_workers: int = 8
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    mean: tuple[float, float, float] | None = None  # None: ImageNet (or Fashion-MNIST stats for that dataset)
    std: tuple[float, float, float] | None = None
    second_size: int = 112  # DALL-E tokenizer view (ignored for pixel targets)
    tokenizer_weights: str | None = None  # DALL-E encoder .safetensors (python -m export convert-tokenizer)
    mask: str = "block"  # block | random
    mask_ratio: float = 0.5  # 98 of 196 patches, as the official scripts
    min_mask_patches_per_block: int = 16
    shuffle_buffer: int = 1000  # webdataset only
    limit: int | None = None  # use only the first N training samples (smoke runs)
    epoch_size: int | None = None  # samples per epoch for webdataset shards (their length is unknown)
    # zoom-out and translation: with probability zoom_out_prob the crop is shrunk to a side fraction in
    # zoom_out and pasted at a random place on a canvas of the image's border colour (crops only zoom in)
    zoom_out: tuple[float, float] = (0.4, 1.0)
    zoom_out_prob: float = 0.0
    jitter: float = 0.0  # brightness/contrast jitter strength (0: off), applied with probability 0.8


@dataclass
class OptimSection:
    epochs: int = 300
    batch_size: int = 2048  # global batch (all processes, after accumulation)
    accum_iter: int = 1
    lr: float = 1.5e-3  # absolute, not scaled by batch (as the official scripts)
    min_lr: float = 1e-5
    warmup_epochs: float = 10
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = 3.0
    # the official top model has no no_weight_decay(): cls_token and mask_token ARE decayed
    decay_tokens: bool = True


@dataclass
class InstanceSection:
    """Instance-level term beside the CAE loss (off in the official presets)."""

    # none | contrastive (InfoNCE: masked view's readout vs a second unmasked view's) | nn_contrastive
    # (MAE-CT/NNCLR: the positive is the other view's nearest neighbour in a queue of queue_size embeddings)
    kind: str = "none"
    weight: float = 1.0
    temperature: float = 0.2
    pooling: str = "cls"  # cls | mean | lastN (e.g. last4, the served readout: last N blocks' cls + mean)
    hidden_dim: int = 1024
    proj_dim: int = 128
    queue_size: int = 16384  # nn_contrastive's support set (about a quarter of Fashion-MNIST)


@dataclass
class RuntimeSection:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on AMX CPUs and GPUs) | fp32 | bf16 | fp16
    compile: bool = False
    fsdp: bool = False
    grad_checkpointing: bool = False
    log_every: int = 20
    save_every_epochs: int = 1
    save_every_steps: int = 0  # 0: only at epoch ends
    keep_last: int = 2
    recon_every_epochs: int = 1  # reconstruction grid PNG (pixel targets)
    tensorboard: bool = True
    max_steps: int | None = None  # stop early (tests, smoke runs)


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    instance: InstanceSection = field(default_factory=InstanceSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def yaml_number(value: Any) -> Any:
    """A string that spells a float as that float: YAML 1.1 (PyYAML) reads ``1e-3`` (no dot) as a string.
    Anything else is returned unchanged, for the caller's type check."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        value = yaml_number(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls`` from a nested mapping: unknown keys are errors, values are checked against the field types
    (``where`` is the dotted path for messages)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown keys {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``, mapping by mapping (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def load_preset_dict(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"no preset or file {name_or_path!r}; presets: {list_presets()}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)  # presets may extend another preset
    if base:
        data = deep_merge(load_preset_dict(base), data)
    return data


def overrides_to_dict(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "model.overrides.depth=6"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: unreadable value ({e})") from e
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(name_or_path: str | None, overrides: list[str] | None = None) -> PretrainConfig:
    data = load_preset_dict(name_or_path) if name_or_path else {}
    data = deep_merge(data, overrides_to_dict(overrides or []))
    cfg = build_dataclass(PretrainConfig, data, "")
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    problems = []
    o, d, r = cfg.optim, cfg.data, cfg.runtime
    if o.epochs < 1:
        problems.append(f"optim.epochs must be >= 1, got {o.epochs}")
    if o.batch_size < 1 or o.accum_iter < 1 or o.batch_size % o.accum_iter:
        problems.append(
            f"optim.batch_size {o.batch_size} must be a positive multiple of accum_iter {o.accum_iter}"
        )
    if not 0 < o.lr < 1 or o.min_lr < 0 or o.min_lr > o.lr:
        problems.append(f"need 0 <= min_lr <= lr < 1, got lr={o.lr} min_lr={o.min_lr}")
    if not 0 < d.mask_ratio < 1:
        problems.append(f"data.mask_ratio must be in (0, 1), got {d.mask_ratio}")
    if d.mask not in ("block", "random"):
        problems.append(f"data.mask must be 'block' or 'random', got {d.mask!r}")
    if r.precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append(f"runtime.precision must be auto|fp32|bf16|fp16, got {r.precision!r}")
    if r.device not in ("auto", "cpu", "cuda"):
        problems.append(f"runtime.device must be auto|cpu|cuda, got {r.device!r}")
    if cfg.instance.kind not in ("none", "contrastive", "nn_contrastive"):
        problems.append(
            f"instance.kind must be 'none', 'contrastive' or 'nn_contrastive', got {cfg.instance.kind!r}"
        )
    if cfg.instance.kind == "nn_contrastive" and cfg.instance.queue_size < cfg.optim.batch_size:
        problems.append(
            f"instance.queue_size must be >= optim.batch_size ({cfg.optim.batch_size}) for nn_contrastive, "
            f"got {cfg.instance.queue_size}"
        )
    pool = cfg.instance.pooling
    last_n = pool.startswith("last") and pool[4:].isdigit() and int(pool[4:]) >= 1
    if not (pool in ("cls", "mean") or last_n):
        # N <= depth is checked where the model is built
        problems.append(f"instance.pooling must be cls, mean or lastN (e.g. last4), got {pool!r}")
    if cfg.instance.temperature <= 0:
        problems.append(f"instance.temperature must be > 0, got {cfg.instance.temperature}")
    if not 0 <= d.zoom_out_prob <= 1 or not 0 < d.zoom_out[0] <= d.zoom_out[1] <= 1:
        problems.append(
            f"need 0 <= data.zoom_out_prob <= 1 and 0 < zoom_out[0] <= zoom_out[1] <= 1, got "
            f"{d.zoom_out_prob} and {list(d.zoom_out)}"
        )
    if d.jitter < 0 or d.jitter >= 1:
        problems.append(f"data.jitter must be in [0, 1), got {d.jitter}")
    if r.keep_last < 1:
        problems.append(f"runtime.keep_last must be >= 1, got {r.keep_last}")
    if problems:
        raise ConfigError("; ".join(problems))
