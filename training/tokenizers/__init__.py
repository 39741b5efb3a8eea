"""Visual tokenizers for CAE's token targets: the DALL-E dVAE (:mod:`.dvae`), its converter (:mod:`.dalle`).

Names are imported lazily (PEP 562) so that ``python -m training.tokenizers.dalle`` runs without the
"found in sys.modules" warning and importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dalle import convert_openai_encoder, load_encoder_state_dict
    from .dvae import (
        LOGIT_LAPLACE_EPS,
        DalleConv2d,
        DalleEncoder,
        DalleEncoderBlock,
        DalleEncoderConfig,
        DalleSecondView,
        DalleTokenizer,
        DalleWeightsError,
        UnsafePickleError,
        infer_encoder_config,
        map_pixels,
    )

__all__ = [
    "LOGIT_LAPLACE_EPS",
    "DalleConv2d",
    "DalleEncoder",
    "DalleEncoderBlock",
    "DalleEncoderConfig",
    "DalleSecondView",
    "DalleTokenizer",
    "DalleWeightsError",
    "UnsafePickleError",
    "convert_openai_encoder",
    "infer_encoder_config",
    "load_encoder_state_dict",
    "map_pixels",
]


_CONVERTER = ("convert_openai_encoder", "load_encoder_state_dict")


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = ".dalle" if name in _CONVERTER else ".dvae"
        return getattr(importlib.import_module(module, __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
