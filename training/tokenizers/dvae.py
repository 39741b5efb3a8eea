"""The OpenAI DALL-E dVAE encoder that produces CAE's token targets: model, tokenizer and its input view.

* :class:`DalleEncoder` - a re-implementation of ``dall_e.encoder.Encoder`` (OpenAI's ``dall_e`` package) with
  the same ``state_dict`` key names and shapes (``blocks.input.w``,
  ``blocks.group_1.block_1.res_path.conv_1.w``, ..., ``blocks.output.conv.b``), and the same numerics,
  including the original's mixed precision on CUDA.
* :func:`map_pixels` - the logit-Laplace input map ``x -> (1 - 2 eps) x + eps`` (eps = 0.1:
  ``0.8 x + 0.1``).
* :class:`DalleTokenizer` - a frozen wrapper with ``get_codebook_indices(x01) -> LongTensor[B, (H/8)*(W/8)]``
  and ``from_safetensors(path)``.
* :class:`DalleSecondView` - the tokenizer's view transform (Lanczos resize to 112, ToTensor, no mean/std).

Nothing here unpickles: the weights come from safetensors files that :mod:`training.tokenizers.dalle` writes.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

logger = logging.getLogger("training.tokenizers.dalle")

__all__ = [
    "LOGIT_LAPLACE_EPS",
    "SAFETENSORS_CONTENT",
    "DalleConv2d",
    "DalleEncoder",
    "DalleEncoderBlock",
    "DalleEncoderConfig",
    "DalleSecondView",
    "DalleTokenizer",
    "DalleWeightsError",
    "UnsafePickleError",
    "build_encoder",
    "infer_encoder_config",
    "map_pixels",
    "read_safetensors",
]

#: eps of the logit-Laplace distribution in ``dall_e.utils`` (``logit_laplace_eps``).
LOGIT_LAPLACE_EPS: float = 0.1

#: ``format`` value written into the safetensors metadata by :func:`convert_openai_encoder`.
SAFETENSORS_CONTENT = "openai-dall_e-encoder-state_dict"


class DalleWeightsError(ValueError):
    """A tokenizer weights file is unknown, damaged, or does not fit :class:`DalleEncoder`."""


class UnsafePickleError(DalleWeightsError):
    """A pickle referenced something outside the explicit allow-list; it was refused before it could run."""


# ------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------


def map_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """Map pixels in [0, 1] into [eps, 1 - eps]: ``(1 - 2 eps) x + eps`` (``dall_e.utils.map_pixels``).

    With the default eps = 0.1 this is ``0.8 x + 0.1``. Unlike the original it accepts any shape.
    """
    if not torch.is_floating_point(x):
        raise TypeError(f"map_pixels expects a floating-point tensor, got {x.dtype}")
    return (1 - 2 * eps) * x + eps


class DalleConv2d(nn.Module):
    """``dall_e.utils.Conv2d``: parameters ``w`` [n_out, n_in, kw, kw] and ``b`` [n_out], padding (kw-1)//2.

    Numerics follow the original: when ``use_float16`` is set and the weights live on a CUDA device the input,
    weight and bias are cast to float16 and the convolution runs in half precision; otherwise the input is
    cast to float32. (The original uses ``use_float16=True`` for every conv except the final 1x1 output conv.)
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
    ``n_blk_per_group`` :class:`DalleEncoderBlock` each with widths ``1, 2, 4, 8 x n_hid`` (``2**(g-1) x
    n_hid``) and a ``pool`` = MaxPool2d(2) after every group but the last, then ``output`` = ReLU + 1x1 conv
    to ``vocab_size`` logits (this conv is never run in float16). The released encoder has group_count=4
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
            "blocks.input.w / blocks.output.conv.w must be 4d, "
            f"got {tuple(w_in.shape)} / {tuple(w_out.shape)}"
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


def build_encoder(state_dict: Mapping[str, Tensor], *, half_precision_on_cuda: bool = True) -> DalleEncoder:
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


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors weights file (FileNotFoundError; DalleWeightsError: damaged)."""
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


# ------------------------------------------------------------------------------------------------------------
# Tokenizer and its view transform
# ------------------------------------------------------------------------------------------------------------


class DalleTokenizer(nn.Module):
    """Frozen DALL-E dVAE tokenizer: images in [0, 1] -> visual token ids (CAE's token targets).

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
        return cls(build_encoder(state_dict, half_precision_on_cuda=half_precision_on_cuda))

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
        Raises FileNotFoundError for a missing file, :class:`DalleWeightsError` for a damaged or foreign one.
        """
        path = Path(path)
        state_dict, metadata = read_safetensors(path)
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
    """The tokenizer's input view, as in the official CAE pipeline (torchvision-compatible).

    Call it on the PIL image of the SAME flipped and cropped region as the encoder view, before any resizing:
    the official ``RandomResizedCropAndInterpolationWithTwoPic`` (after ``RandomHorizontalFlip``) draws one
    crop box and resizes it twice from the original pixels, to 224 bicubic for the encoder and to
    ``second_input_size`` = 112 with Lanczos for the tokenizer. So pass ``img.crop(box)`` (flipped as the
    encoder view), not the 224x224 encoder image. It returns ``ToTensor`` output: float32 [3, size, size] in
    [0, 1]. No mean/std normalization: :func:`map_pixels` is applied inside
    :meth:`DalleTokenizer.get_codebook_indices`.
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
