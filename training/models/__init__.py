"""CAE models: the one definition used by pretraining, evaluation, export and the torch backend."""

from .cae import (
    CAE,
    READOUTS,
    CAEConfig,
    CAEOutput,
    mask_indices,
    parse_readout,
    patchify,
    readout_dim,
    unpatchify,
)
from .checkpoint import CheckpointError, convert_checkpoint, load_model, save_model
from .registry import create_model, list_models, register_model

__all__ = [
    "READOUTS",
    "CAE",
    "CAEConfig",
    "CAEOutput",
    "CheckpointError",
    "convert_checkpoint",
    "create_model",
    "list_models",
    "load_model",
    "mask_indices",
    "parse_readout",
    "patchify",
    "readout_dim",
    "register_model",
    "save_model",
    "unpatchify",
]
