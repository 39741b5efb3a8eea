"""Model registry: one small function per size, as timm and MAE do.

Widths, depths and heads are the official ones (Atten4Vis/CAE ``models/modeling_cae.py``). The regressor
and decoder use the official constructor defaults (Dd = D, depth 4/4, 12 heads, layer scale 0.1) except
CAE-large, which is registered as the authors actually ran it: Dd = 768 with the 1024 -> 768 projection (their
script drops the ``--decoder_embed_dim 1024`` line), so released large checkpoints load into it unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from .cae import CAE, CAEConfig

__all__ = ["create_model", "list_models", "register_model", "official_num_heads"]

_MODELS: dict[str, Callable[..., CAE]] = {}


def register_model(fn: Callable[..., CAE]) -> Callable[..., CAE]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> CAE:
    """Build a registered CAE by name; any :class:`CAEConfig` field can be overridden by keyword."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {list_models()}")
    return _MODELS[name](**overrides)


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> CAE:
    return CAE(CAEConfig.from_dict({**defaults, **overrides}))


@register_model
def cae_tiny_patch16_224(**kwargs: Any) -> CAE:
    return _build(dict(embed_dim=192, depth=12, num_heads=12, decoder_embed_dim=192), kwargs)


@register_model
def cae_small_patch16_224(**kwargs: Any) -> CAE:
    return _build(dict(embed_dim=384, depth=12, num_heads=12, decoder_embed_dim=384), kwargs)


@register_model
def cae_base_patch16_224(**kwargs: Any) -> CAE:
    return _build(dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, init_values=0.1), kwargs)


@register_model
def cae_large_patch16_224(**kwargs: Any) -> CAE:
    return _build(
        dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=768, init_values=1e-5), kwargs
    )


# Encoder heads of the official registered functions, by width (heads are not visible in tensor shapes).
_OFFICIAL_HEADS_BY_NAME = {"tiny": 12, "small": 12, "base": 12, "large": 16}
_OFFICIAL_HEADS_BY_WIDTH = {192: 12, 384: 12, 768: 12, 1024: 16}


def official_num_heads(embed_dim: int, model_name: str | None = None) -> int | None:
    """Encoder head count of an official size, from its registered name or, failing that, its width."""
    if model_name:
        for size, heads in _OFFICIAL_HEADS_BY_NAME.items():
            if model_name.startswith(f"cae_{size}_"):
                return heads
    return _OFFICIAL_HEADS_BY_WIDTH.get(embed_dim)
