"""The OpenAI DALL-E dVAE encoder used by CAE as its token target (spec §3), without unpickling at run time.

What is here:

* :class:`DalleEncoder` - a re-implementation of ``dall_e.encoder.Encoder`` (OpenAI's ``dall_e`` package) with
  the same ``state_dict`` key names and shapes (``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``,
  ..., ``blocks.output.conv.b``), and the same numerics, including the original's mixed precision on CUDA.
* :func:`map_pixels` - the logit-Laplace input map ``x -> (1 - 2 eps) x + eps`` (eps = 0.1, i.e. ``0.8 x + 0.1``).
* :class:`DalleTokenizer` - a frozen wrapper with ``get_codebook_indices(x01) -> LongTensor[B, (H/8)*(W/8)]``
  and ``from_safetensors(path)``.
* :class:`DalleSecondView` - the tokenizer's view transform (Lanczos resize to 112, ToTensor, no mean/std).
* :func:`convert_openai_encoder` - the one-time conversion of OpenAI's ``encoder.pkl`` (a ``torch.save`` of the
  whole ``Encoder`` module object) to safetensors, through ``torch.load(weights_only=True)`` and an explicit
  allow-list of inert stand-in classes: nothing outside the allow-list can be constructed or called.

Command line (one-time conversion)::

    python -m training.tokenizers.dalle /path/to/encoder.pkl /path/to/dalle_encoder.safetensors
"""

from __future__ import annotations

import _compat_pickle
import argparse
import hashlib
import logging
import math
import pickle
import re
import types
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

logger = logging.getLogger(__name__)

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

#: eps of the logit-Laplace distribution in ``dall_e.utils`` (``logit_laplace_eps``).
LOGIT_LAPLACE_EPS: float = 0.1

#: ``format`` value written into the safetensors metadata by :func:`convert_openai_encoder`.
SAFETENSORS_CONTENT = "openai-dall_e-encoder-state_dict"


class DalleWeightsError(ValueError):
    """A tokenizer weights file is unknown, damaged, or does not fit :class:`DalleEncoder`."""


class UnsafePickleError(DalleWeightsError):
    """A pickle referenced something outside the explicit allow-list; it was refused before it could run."""


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------


def map_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """Map pixels in [0, 1] into [eps, 1 - eps]: ``(1 - 2 eps) x + eps`` (``dall_e.utils.map_pixels``).

    With the default eps = 0.1 this is ``0.8 x + 0.1``. Unlike the original it accepts any shape.
    """
    if not torch.is_floating_point(x):
        raise TypeError(f"map_pixels expects a floating-point tensor, got {x.dtype}")
    return (1 - 2 * eps) * x + eps


class DalleConv2d(nn.Module):
    """``dall_e.utils.Conv2d``: parameters ``w`` [n_out, n_in, kw, kw] and ``b`` [n_out], padding (kw - 1) // 2.

    Numerics follow the original: when ``use_float16`` is set and the weights live on a CUDA device the input,
    weight and bias are cast to float16 and the convolution runs in half precision; otherwise the input is cast
    to float32. (The original uses ``use_float16=True`` for every conv except the final 1x1 output conv.)
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        kw: int,
        use_float16: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if n_in < 1 or n_out < 1:
            raise ValueError(f"n_in and n_out must be >= 1, got {n_in}, {n_out}")
        if kw < 1 or kw % 2 != 1:
            raise ValueError(f"kw must be odd and >= 1, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16 = use_float16
        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32, device=device)
        if w.device.type != "meta":
            w.normal_(std=1 / math.sqrt(n_in * kw**2))
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros((n_out,), dtype=torch.float32, device=device))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_float16 and self.w.device.type == "cuda":
            if x.dtype != torch.float16:
                x = x.half()
            w, b = self.w.half(), self.b.half()
        else:
            if x.dtype != torch.float32:
                x = x.float()
            w, b = self.w, self.b
        return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}, kw={self.kw}, use_float16={self.use_float16}"


class DalleEncoderBlock(nn.Module):
    """``dall_e.encoder.EncoderBlock``: ``id_path(x) + post_gain * res_path(x)``.

    ``id_path`` is a 1x1 conv where ``n_in != n_out`` and the identity otherwise; ``res_path`` is
    relu -> conv3x3 -> relu -> conv3x3 -> relu -> conv3x3 -> relu -> conv1x1 with ``n_hid = n_out // 4``;
    ``post_gain = 1 / n_layers**2`` where ``n_layers`` is the total number of blocks in the encoder.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_layers: int,
        use_float16: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if n_in < 1 or n_layers < 1:
            raise ValueError(f"n_in and n_layers must be >= 1, got {n_in}, {n_layers}")
        if n_out < 4 or n_out % 4 != 0:
            raise ValueError(f"n_out must be a positive multiple of 4, got {n_out}")
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)

        def conv(a: int, b: int, kw: int) -> DalleConv2d:
            return DalleConv2d(a, b, kw, use_float16=use_float16, device=device)

        self.id_path: nn.Module = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", conv(n_in, self.n_hid, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", conv(self.n_hid, self.n_hid, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", conv(self.n_hid, self.n_hid, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", conv(self.n_hid, n_out, 1)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


@dataclass(frozen=True)
class DalleEncoderConfig:
    """Hyper-parameters of :class:`DalleEncoder` (defaults: OpenAI's released encoder)."""

    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    input_channels: int = 3
    vocab_size: int = 8192


class DalleEncoder(nn.Module):
    """Re-implementation of OpenAI's ``dall_e.encoder.Encoder`` with identical ``state_dict`` keys and shapes.

    ``blocks`` = input conv (7x7, ``input_channels -> n_hid``), groups ``group_1 .. group_{G}`` of
    ``n_blk_per_group`` :class:`DalleEncoderBlock` each with widths ``1, 2, 4, 8 x n_hid`` (``2**(g-1) x n_hid``)
    and a ``pool`` = MaxPool2d(2) after every group but the last, then ``output`` = ReLU + 1x1 conv to
    ``vocab_size`` logits (this conv is never run in float16). The released encoder has group_count=4
    (downsampling 8), n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192.

    ``half_precision_on_cuda`` (default True, as the original) runs every conv except the output conv in
    float16 when the weights are on a CUDA device; set it to False for float32 throughout.
    Input must be ``[B, input_channels, H, W]`` already passed through :func:`map_pixels`.

    (The original also validates n_hid >= 64 and vocab_size >= 512; those limits are not enforced here so that
    tests can use tiny models.)
    """

    def __init__(
        self,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
        *,
        half_precision_on_cuda: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if group_count < 1:
            raise ValueError(f"group_count must be >= 1, got {group_count}")
        if n_hid < 4 or n_hid % 4 != 0:
            raise ValueError(f"n_hid must be a positive multiple of 4, got {n_hid}")
        if n_blk_per_group < 1 or input_channels < 1 or vocab_size < 1:
            raise ValueError("n_blk_per_group, input_channels and vocab_size must be >= 1")
        self.config = DalleEncoderConfig(group_count, n_hid, n_blk_per_group, input_channels, vocab_size)
        self.group_count = group_count
        self.n_hid = n_hid
        self.n_blk_per_group = n_blk_per_group
        self.input_channels = input_channels
        self.vocab_size = vocab_size
        self.downsample = 2 ** (group_count - 1)

        n_layers = group_count * n_blk_per_group
        layers: list[tuple[str, nn.Module]] = [
            (
                "input",
                DalleConv2d(input_channels, n_hid, 7, use_float16=half_precision_on_cuda, device=device),
            )
        ]
        for g in range(1, group_count + 1):
            n_out = 2 ** (g - 1) * n_hid
            n_first_in = n_hid if g == 1 else 2 ** (g - 2) * n_hid
            group: list[tuple[str, nn.Module]] = [
                (
                    f"block_{i + 1}",
                    DalleEncoderBlock(
                        n_first_in if i == 0 else n_out,
                        n_out,
                        n_layers,
                        use_float16=half_precision_on_cuda,
                        device=device,
                    ),
                )
                for i in range(n_blk_per_group)
            ]
            if g < group_count:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
        n_last = 2 ** (group_count - 1) * n_hid
        output = OrderedDict(
            [
                ("relu", nn.ReLU()),
                ("conv", DalleConv2d(n_last, vocab_size, 1, use_float16=False, device=device)),
            ]
        )
        layers.append(("output", nn.Sequential(output)))
        self.blocks = nn.Sequential(OrderedDict(layers))

    @classmethod
    def from_config(cls, config: DalleEncoderConfig, **kwargs: Any) -> DalleEncoder:
        return cls(**asdict(config), **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"input shape {tuple(x.shape)} is not 4d")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"input has {x.shape[1]} channels but model built for {self.input_channels}")
        if x.dtype != torch.float32:
            raise ValueError(f"input must have dtype torch.float32, got {x.dtype}")
        return self.blocks(x)


def infer_encoder_config(state_dict: Mapping[str, Tensor]) -> DalleEncoderConfig:
    """Infer :class:`DalleEncoderConfig` from the tensor shapes of a ``dall_e`` Encoder state_dict."""
    for key in ("blocks.input.w", "blocks.output.conv.w"):
        if key not in state_dict:
            sample = ", ".join(sorted(state_dict)[:5]) or "<none>"
            raise DalleWeightsError(
                f"not a DALL-E encoder state_dict: missing {key!r} (first keys: {sample})"
            )
    w_in, w_out = state_dict["blocks.input.w"], state_dict["blocks.output.conv.w"]
    if w_in.ndim != 4 or w_out.ndim != 4:
        raise DalleWeightsError(
            f"blocks.input.w / blocks.output.conv.w must be 4d, got {tuple(w_in.shape)} / {tuple(w_out.shape)}"
        )
    groups = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.group_(\d+)\.", k))}
    if not groups or groups != set(range(1, max(groups) + 1)):
        raise DalleWeightsError(f"DALL-E encoder groups must be numbered 1..G, found {sorted(groups)}")
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    if not blocks or blocks != set(range(1, max(blocks) + 1)):
        raise DalleWeightsError(
            f"DALL-E encoder blocks of group_1 must be numbered 1..N, found {sorted(blocks)}"
        )
    return DalleEncoderConfig(
        group_count=max(groups),
        n_hid=int(w_in.shape[0]),
        n_blk_per_group=max(blocks),
        input_channels=int(w_in.shape[1]),
        vocab_size=int(w_out.shape[0]),
    )


def _build_and_load(state_dict: Mapping[str, Tensor], *, half_precision_on_cuda: bool = True) -> DalleEncoder:
    """Build a :class:`DalleEncoder` of the inferred size and load ``state_dict`` strictly (zero copy)."""
    config = infer_encoder_config(state_dict)
    try:
        model = DalleEncoder.from_config(config, half_precision_on_cuda=half_precision_on_cuda, device="meta")
    except ValueError as e:
        raise DalleWeightsError(f"inferred DALL-E encoder config {config} is invalid: {e}") from e
    for key, t in state_dict.items():
        if not isinstance(t, Tensor) or not torch.is_floating_point(t):
            raise DalleWeightsError(f"{key!r} is not a floating-point tensor ({type(t).__name__})")
    sd = {k: v.float() for k, v in state_dict.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise DalleWeightsError(f"weights do not fit a DALL-E encoder with {config}: {e}") from e
    return model


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and its view transform
# --------------------------------------------------------------------------------------------------------------


class DalleTokenizer(nn.Module):
    """Frozen DALL-E dVAE tokenizer: images in [0, 1] -> visual token ids (CAE spec §3).

    The wrapped :class:`DalleEncoder` never trains: its parameters have ``requires_grad=False`` and the module
    stays in eval mode (``train()`` is a no-op).
    """

    def __init__(self, encoder: DalleEncoder, eps: float = LOGIT_LAPLACE_EPS) -> None:
        super().__init__()
        self.encoder = encoder
        self.eps = eps
        self.encoder.requires_grad_(False)
        super().train(False)

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def downsample(self) -> int:
        return self.encoder.downsample

    def train(self, mode: bool = True) -> DalleTokenizer:
        """Frozen: always stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def get_codebook_indices(self, x01: Tensor) -> Tensor:
        """Token ids for images ``x01`` [B, C, H, W] with values in [0, 1] (ToTensor output, no mean/std).

        Applies :func:`map_pixels` (``0.8 x + 0.1``), runs the encoder, takes the argmax over the vocabulary
        and flattens the ``(H/8) x (W/8)`` grid row-major: returns a LongTensor [B, (H/8) * (W/8)] in
        ``[0, vocab_size)``. Autocast is disabled inside (the official code runs the tokenizer outside
        autocast), so the result does not depend on the caller's autocast context; on CUDA the original's own
        float16 convs still apply unless the encoder was built with ``half_precision_on_cuda=False``.
        """
        if x01.ndim != 4:
            raise ValueError(f"expected [B, C, H, W], got shape {tuple(x01.shape)}")
        h, w = x01.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"H and W must be multiples of {self.downsample}, got {h}x{w}")
        x = map_pixels(x01.float(), self.eps)
        device_type = x.device.type
        if device_type in ("cuda", "cpu"):
            with torch.autocast(device_type=device_type, enabled=False):
                logits = self.encoder(x)
        else:
            logits = self.encoder(x)
        return torch.argmax(logits, dim=1).flatten(1)

    def forward(self, x01: Tensor) -> Tensor:
        """Same as :meth:`get_codebook_indices`."""
        return self.get_codebook_indices(x01)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Tensor], *, half_precision_on_cuda: bool = True
    ) -> DalleTokenizer:
        """Build from an in-memory Encoder state_dict (sizes inferred from the shapes, strict load)."""
        return cls(_build_and_load(state_dict, half_precision_on_cuda=half_precision_on_cuda))

    @classmethod
    def from_safetensors(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        half_precision_on_cuda: bool = True,
    ) -> DalleTokenizer:
        """Load a safetensors file written by :func:`convert_openai_encoder` (or any Encoder state_dict).

        The vocabulary size, n_hid, group count and blocks per group are inferred from the tensor shapes.
        Raises FileNotFoundError for a missing file and :class:`DalleWeightsError` for a damaged or foreign one.
        """
        path = Path(path)
        state_dict, metadata = _read_safetensors(path)
        content = metadata.get("content")
        if content is not None and content != SAFETENSORS_CONTENT:
            raise DalleWeightsError(
                f"{path}: safetensors content is {content!r}, expected {SAFETENSORS_CONTENT!r}"
            )
        try:
            tokenizer = cls.from_state_dict(state_dict, half_precision_on_cuda=half_precision_on_cuda)
        except DalleWeightsError as e:
            raise DalleWeightsError(f"{path}: {e}") from e
        tokenizer = tokenizer.to(device)
        logger.info(
            "loaded DALL-E tokenizer from %s (%s, source sha256 %s)",
            path,
            tokenizer.encoder.config,
            metadata.get("source_sha256", "unknown"),
        )
        return tokenizer


class DalleSecondView:
    """The tokenizer's input view, as in the official CAE pipeline (spec §3, §4; torchvision-compatible).

    Call it on the PIL image of the SAME flipped and cropped region as the encoder view, before any resizing:
    the official ``RandomResizedCropAndInterpolationWithTwoPic`` (after ``RandomHorizontalFlip``) draws one crop
    box and resizes it twice from the original pixels, to 224 bicubic for the encoder and to
    ``second_input_size`` = 112 with Lanczos for the tokenizer. So pass ``img.crop(box)`` (flipped as the encoder
    view), not the 224x224 encoder image. It returns ``ToTensor`` output: float32 [3, size, size] in [0, 1].
    No mean/std normalization: :func:`map_pixels` is applied inside :meth:`DalleTokenizer.get_codebook_indices`.
    """

    def __init__(self, size: int | tuple[int, int] = 112) -> None:
        self.size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"size must be positive, got {size}")

    def __call__(self, img: Image.Image) -> Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if not isinstance(img, Image.Image):
            raise TypeError(
                f"DalleSecondView expects a PIL image (Lanczos is PIL-only), got {type(img).__name__}"
            )
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = TF.resize(img, list(self.size), interpolation=InterpolationMode.LANCZOS)
        return TF.to_tensor(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation=lanczos, normalize=None)"


# --------------------------------------------------------------------------------------------------------------
# One-time conversion of OpenAI's encoder.pkl
# --------------------------------------------------------------------------------------------------------------


class _PickledModuleStandIn:
    """Inert record of a pickled module object: the pickle may create it and set its state, nothing else.

    It has no ``__init__``/``__call__``/``forward``; ``__setstate__`` only stores the state dict. Subclasses are
    made per allowed name and per load by :func:`_make_stand_ins`.
    """

    pickled_name: str = "?"
    # Read by torch's legacy loader when a saved class source differs from the current one; never dump patches.
    dump_patches: bool = False

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(
                f"unexpected pickled state of type {type(state).__name__} for {self.pickled_name}"
            )
        object.__setattr__(self, "_pickled_state", state)

    @property
    def pickled_state(self) -> dict[Any, Any]:
        return self.__dict__.get("_pickled_state", {})

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_name}>"


# Every class that OpenAI's encoder.pkl references (it is a torch.save of the whole dall_e Encoder module).
# SECURITY - why this is safe: the file is never given to a plain unpickler. Every global the pickle names is
# resolved only through an explicit allow-list, never by importing anything:
#   * zip files (torch >= 1.6): torch.load(weights_only=True), whose pure-Python unpickler allows torch's own
#     vetted list (tensor rebuild functions, storages, Parameter, OrderedDict, torch.device, set, dtypes) plus
#     the names registered here, and refuses to NEWOBJ/BUILD any other type;
#   * legacy (non-zip) files: torch.load(weights_only=True) cannot read a pickled module there (the classes
#     are saved as persistent ids), so torch's legacy reader is driven with _RestrictedUnpickler, whose
#     find_class returns only _LEGACY_ALLOWED_GLOBALS plus the names registered here.
# Each module class name maps to a fresh inert stand-in (_PickledModuleStandIn subclass made per load), NOT to
# the real class: the unpickler can only create it and hand it its state dict, so no code of dall_e or of
# torch.nn runs. Anything else (os.system, builtins.eval, the real dall_e classes, ...) is refused before it can
# be called. Nothing is put into sys.modules and the real dall_e package is never imported, installed or not.
_ALLOWED_MODULE_NAMES: tuple[str, ...] = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
)

# Non-module globals a legacy torch.save of a module uses (storage types are handled by torch's own wrapper,
# which maps any "...Storage" name to an inert StorageType). All are data constructors without side effects.
_LEGACY_ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
}


def _make_stand_ins() -> dict[str, type[_PickledModuleStandIn]]:
    """Fresh stand-in classes for one load (so a hostile BUILD on a class cannot leak into a later load)."""
    return {
        name: type(
            f"_StandIn_{name.rsplit('.', 1)[1]}",
            (_PickledModuleStandIn,),
            {"pickled_name": name, "__module__": __name__},
        )
        for name in _ALLOWED_MODULE_NAMES
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class resolves only the allow-list (see the SECURITY note above)."""

    allowed: dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles written by Python 3 use Python 2 names (e.g. __builtin__.set); map them back as the
        # default find_class would, without importing anything.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full_name = f"{module}.{name}"
        if full_name in self.allowed:
            return self.allowed[full_name]
        raise pickle.UnpicklingError(f"GLOBAL {full_name} was not an allowed global")


def _restricted_pickle_module(stand_ins: Mapping[str, type[_PickledModuleStandIn]]) -> types.ModuleType:
    """A ``pickle_module`` for torch.load whose Unpickler and load() are restricted to the allow-list."""
    unpickler = type(
        "_DalleRestrictedUnpickler",
        (_RestrictedUnpickler,),
        {"allowed": {**_LEGACY_ALLOWED_GLOBALS, **stand_ins}},
    )

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    module = types.ModuleType("_dalle_restricted_pickle")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


_STATE_DICT_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "encoder.")
_MAX_DEPTH = 32


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"DALL-E tokenizer weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise DalleWeightsError(
            f"{path}: not a readable safetensors file (damaged or truncated?): {type(e).__name__}: {e}"
        ) from e
    return tensors, metadata


_REFUSAL_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"GLOBAL (\S+) was not an allowed global", "it references {0}, which is not in the allow-list"),
    (r"unsupported GLOBAL (\S+) whose module", "it references {0}, whose module is blocked"),
    (r"Trying to call reduce for unrecognized function (.+)", "it tries to call {0}"),
    (
        r"Can only create new object for nn.Parameter or classes allowlisted via `add_safe_globals` but got (.+)",
        "it tries to create {0}",
    ),
    (
        r"Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but got (.+)",
        "it tries to set the state of {0}",
    ),
)


def _refusal_reason(message: str) -> str | None:
    """Why torch's weights-only unpickler refused a file, or None if the error is not a refusal."""
    for pattern, text in _REFUSAL_PATTERNS:
        m = re.search(pattern, message)
        if m:
            return text.format(m.group(1).strip().rstrip("."))
    return None


def _torch_load_restricted(path: Path) -> Any:
    """torch.load of ``path`` with only the allow-list resolvable (see the SECURITY note); refuses the rest."""
    if not hasattr(torch.serialization, "safe_globals"):
        raise RuntimeError("converting encoder.pkl needs torch.serialization.safe_globals (torch >= 2.6)")
    stand_ins = _make_stand_ins()
    with path.open("rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        with warnings.catch_warnings():
            # Legacy files may carry the source of the saved classes, which torch compares against the
            # stand-ins and warns about; irrelevant here since only parameters are read.
            warnings.simplefilter("ignore")
            if is_zip:
                allow = [(cls, name) for name, cls in stand_ins.items()]
                with torch.serialization.safe_globals(allow):
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
            return torch.load(
                path,
                map_location="cpu",
                weights_only=False,  # safe: every global goes through _RestrictedUnpickler.find_class
                pickle_module=_restricted_pickle_module(stand_ins),
                mmap=False,
            )
    except pickle.UnpicklingError as e:
        reason = _refusal_reason(str(e))
        if reason is not None:
            raise UnsafePickleError(
                f"{path}: refused to unpickle: {reason}. Only the DALL-E encoder classes and tensor types are "
                "allowed; the file was not loaded and none of its code ran. Do not load it with a "
                "plain unpickle (torch.load(weights_only=False)) unless you trust its source."
            ) from None
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DalleWeightsError(f"{path}: damaged or unknown pickle: {last}") from None
    except (
        EOFError,
        RuntimeError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
    ) as e:
        raise DalleWeightsError(
            f"{path}: cannot read as a torch file (damaged or truncated?): {type(e).__name__}: {e}"
        ) from e


def _module_state(obj: Any) -> dict[Any, Any]:
    if isinstance(obj, _PickledModuleStandIn):
        return obj.pickled_state
    if isinstance(obj, nn.Module):  # only if a real nn class was allow-listed elsewhere in the process
        return vars(obj)
    raise DalleWeightsError(f"unexpected object of type {type(obj).__name__} in the pickled module tree")


def _collect_state_dict(root: Any) -> dict[str, Tensor]:
    """Walk a pickled module tree (``_modules``/``_parameters``/``_buffers``) into a flat state_dict."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()

    def walk(obj: Any, prefix: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise DalleWeightsError(f"pickled module tree is deeper than {_MAX_DEPTH} at {prefix!r}")
        if id(obj) in seen:
            raise DalleWeightsError(f"pickled module tree has a shared or cyclic module at {prefix!r}")
        seen.add(id(obj))
        state = _module_state(obj)
        non_persistent = state.get("_non_persistent_buffers_set") or set()
        for attr in ("_parameters", "_buffers"):
            tensors = state.get(attr) or {}
            if not isinstance(tensors, Mapping):
                raise DalleWeightsError(
                    f"{prefix or '<root>'}: {attr} is a {type(tensors).__name__}, not a dict"
                )
            for name, t in tensors.items():
                if t is None or (attr == "_buffers" and name in non_persistent):
                    continue
                if not isinstance(t, Tensor):
                    raise DalleWeightsError(f"{prefix}{name}: expected a tensor, got {type(t).__name__}")
                out[f"{prefix}{name}"] = t.detach()
        children = state.get("_modules") or {}
        if not isinstance(children, Mapping):
            raise DalleWeightsError(
                f"{prefix or '<root>'}: _modules is a {type(children).__name__}, not a dict"
            )
        for name, child in children.items():
            if child is not None:
                walk(child, f"{prefix}{name}.", depth + 1)

    walk(root, "", 0)
    return out


def _normalize_state_dict(obj: Mapping[Any, Any]) -> dict[str, Tensor]:
    """A plain state_dict (possibly wrapped in {'state_dict': ...} or with a 'module.'-style prefix)."""
    for wrapper in ("state_dict", "model", "encoder"):
        inner = obj.get(wrapper)
        if len(obj) == 1 and isinstance(inner, Mapping):
            obj = inner
            break
    if not obj or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise DalleWeightsError("expected a dict of parameter name -> tensor")
    sd: dict[str, Tensor] = {k: v.detach() for k, v in obj.items()}
    for prefix in _STATE_DICT_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_encoder_state_dict(src: str | Path) -> tuple[dict[str, Tensor], str]:
    """Read Encoder weights from ``src`` without ever running a plain unpickle.

    Accepts OpenAI's ``encoder.pkl`` (the whole pickled module, zip or legacy torch format), a ``torch.save``
    of an Encoder state_dict, or a safetensors file. Returns ``(state_dict, source_format)`` where
    ``source_format`` is ``"openai-pickled-module"``, ``"state_dict"`` or ``"safetensors"``.
    """
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"DALL-E encoder weights not found: {src}")
    if src.stat().st_size == 0:
        raise DalleWeightsError(f"{src}: file is empty")
    if _is_safetensors(src):
        tensors, _ = _read_safetensors(src)
        return _normalize_state_dict(tensors), "safetensors"
    obj = _torch_load_restricted(src)
    if isinstance(obj, (_PickledModuleStandIn, nn.Module)):
        name = getattr(obj, "pickled_name", type(obj).__name__)
        if name != "dall_e.encoder.Encoder":
            raise DalleWeightsError(f"{src}: pickled object is a {name}, expected dall_e.encoder.Encoder")
        try:
            return _collect_state_dict(obj), "openai-pickled-module"
        except DalleWeightsError as e:
            raise DalleWeightsError(f"{src}: {e}") from e
    if isinstance(obj, Mapping):
        try:
            return _normalize_state_dict(obj), "state_dict"
        except DalleWeightsError as e:
            raise DalleWeightsError(f"{src}: {e}") from e
    raise DalleWeightsError(
        f"{src}: unknown content of type {type(obj).__name__}; expected OpenAI's pickled dall_e Encoder "
        "(encoder.pkl) or an Encoder state_dict"
    )


def convert_openai_encoder(src: str | Path, dst: str | Path) -> dict[str, Tensor]:
    """Convert OpenAI's ``encoder.pkl`` (or an Encoder state_dict file) to safetensors, once.

    The pickle is read with ``torch.load(weights_only=True)`` and an explicit allow-list of inert stand-ins
    (see :data:`_ALLOWED_MODULE_NAMES`); a file that references anything else is refused with
    :class:`UnsafePickleError` and none of it runs. The parameters are gathered under the original key names,
    checked to load strictly into a :class:`DalleEncoder` of the inferred size, and written as float32 to
    ``dst`` with metadata ``format``, ``content``, ``source_format``, ``source_file``, ``source_sha256`` and the
    inferred config. Returns the state_dict that was written.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    state_dict, source_format = load_encoder_state_dict(src)
    try:
        model = _build_and_load(state_dict)
    except DalleWeightsError as e:
        raise DalleWeightsError(f"{src}: {e}") from e
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "pt",
        "content": SAFETENSORS_CONTENT,
        "source_format": source_format,
        "source_file": src.name,
        "source_sha256": _sha256(src),
        **{k: str(v) for k, v in asdict(model.config).items()},
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        save_file(out, str(tmp), metadata=metadata)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info(
        "converted %s (%s, sha256 %s) -> %s: %d tensors, %s",
        src,
        source_format,
        metadata["source_sha256"],
        dst,
        len(out),
        model.config,
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.tokenizers.dalle SRC DST``: one-time conversion of encoder.pkl to safetensors."""
    parser = argparse.ArgumentParser(
        description="Convert OpenAI's DALL-E encoder.pkl (or an Encoder state_dict) to safetensors, safely."
    )
    parser.add_argument("src", type=Path, help="OpenAI encoder.pkl, or an Encoder state_dict file")
    parser.add_argument("dst", type=Path, help="output .safetensors path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert_openai_encoder(args.src, args.dst)
    except (DalleWeightsError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
