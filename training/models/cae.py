"""CAE: Context Autoencoder (Chen et al., arXiv 2202.03026), faithful to the authors' implementation.

Pipeline for a batch of images and a boolean mask [B, N] (True = masked, same count in every row):

    forward_encoder   visible patches (+cls)            -> latent_visible [B, 1+Nv, D]
    forward_regressor mask tokens cross-attend visible  -> latent_pred    [B, Nm, Dd]
    forward_target    the same encoder, no grad, on the
                      masked patches only (+cls)        -> latent_target  [B, Nm, Dd]
    forward_decoder   latent_pred + positions           -> pred           [B, Nm, vocab | p*p*C]
    forward_loss      CE (tokens) or MSE (pixels) + align_loss_weight * MSE(latent_pred, latent_target)

The official code keeps a second copy of the encoder ("alignment_encoder") whose storage is re-aliased to
the encoder after every step: a momentum-0 teacher. We run the live encoder itself under ``no_grad``,
which computes the same thing (drop-path included in train mode) without the duplicate weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    Block,
    PatchEmbed,
    RegressorBlock,
    build_2d_sincos_position_embedding,
    drop_path_rates,
)
from .losses import linear_cross_entropy

__all__ = ["CAE", "CAEConfig", "CAEOutput", "Encoder", "patchify", "unpatchify"]

TargetType = Literal["dalle", "pixel"]


@dataclass
class CAEConfig:
    """Every hyper-parameter of the network. Saved as JSON inside each checkpoint."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float = 0.1  # encoder layer scale (0 -> no gammas)
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-6
    # latent contextual regressor and decoder (Dd = decoder_embed_dim)
    decoder_embed_dim: int = 768
    regressor_depth: int = 4
    decoder_depth: int = 4
    decoder_num_heads: int = 12
    decoder_mlp_ratio: float = 4.0
    decoder_layer_scale_init_value: float = 0.1
    # encoder -> regressor projection; None = add it exactly when Dd != D (the official rule)
    use_projection: bool | None = None
    # pretext target: "dalle" = DALL-E token ids (official), "pixel" = per-patch normalized pixels (MAE)
    target: TargetType = "dalle"
    vocab_size: int = 8192
    norm_pix_loss: bool = True
    align_loss_weight: float = 2.0
    # the paper's ablations, beside the faithful path: recon_loss_weight 0 = alignment without
    # reconstruction; arch "mae" = no regressor/alignment split, mask tokens join the visible latents in
    # one decoder (MAE-style)
    recon_loss_weight: float = 1.0
    arch: Literal["cae", "mae"] = "cae"
    # optional explicit widths (the official 1020-wide attention of Dd=1024 with 12 heads is the default
    # rule dim // heads * heads; these only matter for converted checkpoints with unusual shapes)
    mlp_hidden_dim: int | None = None
    decoder_mlp_hidden_dim: int | None = None
    # encoder-only models (from official fine-tuned / linear-probe checkpoints): no regressor/decoder;
    # fine-tuned official encoders also carry a per-block relative position bias
    encoder_only: bool = False
    use_rel_pos_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (e.g. source checkpoint)

    def __post_init__(self) -> None:
        problems = []
        if self.img_size % self.patch_size != 0:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_heads <= 0 or self.embed_dim // self.num_heads == 0:
            problems.append(f"num_heads {self.num_heads} is invalid for embed_dim {self.embed_dim}")
        for name in ("embed_dim", "decoder_embed_dim"):
            if getattr(self, name) % 4 != 0:
                problems.append(f"{name} {getattr(self, name)} must be divisible by 4 (2-D sin-cos table)")
        if self.decoder_num_heads <= 0 or self.decoder_embed_dim // self.decoder_num_heads == 0:
            problems.append(
                f"decoder_num_heads {self.decoder_num_heads} is invalid for Dd {self.decoder_embed_dim}"
            )
        if self.arch not in ("cae", "mae"):
            problems.append(f"arch must be 'cae' or 'mae', got {self.arch!r}")
        if self.target not in ("dalle", "pixel"):
            problems.append(f"target must be 'dalle' or 'pixel', got {self.target!r}")
        for name in ("depth", "regressor_depth"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_depth < 0:
            problems.append(f"decoder_depth must be >= 0, got {self.decoder_depth}")
        if problems:
            raise ValueError("invalid CAE config: " + "; ".join(problems))

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return (g, g)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def has_projection(self) -> bool:
        return (
            self.decoder_embed_dim != self.embed_dim if self.use_projection is None else self.use_projection
        )

    @property
    def pred_dim(self) -> int:
        return self.vocab_size if self.target == "dalle" else self.patch_size**2 * self.in_chans

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CAE config keys: {unknown}; known keys: {sorted(known)}")
        return cls(**d)


@dataclass
class CAEOutput:
    """What ``CAE.forward(images, mask)`` returns (all masked-token tensors in ascending patch order)."""

    latent_visible: Tensor  # [B, 1+Nv, D] encoder output incl. cls, after the final norm
    latent_pred: Tensor  # [B, Nm, Dd] regressor output after its norm
    latent_target: Tensor  # [B, Nm, Dd] encoder on the masked patches, no grad (projected if Dd != D)
    # [B, Nm, vocab] token logits or [B, Nm, p*p*C] pixel predictions; None when CAE.forward(head=False)
    # left the head to forward_loss (``decoded`` then holds its input)
    pred: Tensor | None
    mask: Tensor  # [B, N] bool, as given
    # pre-norm outputs of the last ``keep_blocks`` blocks on cls + the visible patches, oldest first (only
    # when asked: the instance-level term on a ``lastN`` readout of the masked view)
    visible_blocks: list[Tensor] = field(default_factory=list)
    decoded: Tensor | None = None  # [B, Nm, Dd] the decoder's normed output (the head's input), head=False

    def predictions(self, model: CAE) -> Tensor:
        """``pred``, computing it from ``decoded`` through ``model``'s head when forward skipped it."""
        if self.pred is not None:
            return self.pred
        if self.decoded is None:
            raise ValueError("CAEOutput has neither pred nor decoded")
        return model.decoder.head(self.decoded)


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] in row-major patch order, (p, p, C) inside a patch as MAE."""
    b, c, h, w = imgs.shape
    gh, gw = h // patch_size, w // patch_size
    x = imgs.reshape(b, c, gh, patch_size, gw, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(x: Tensor, patch_size: int, grid: tuple[int, int], in_chans: int = 3) -> Tensor:
    """Inverse of :func:`patchify`."""
    b = x.shape[0]
    gh, gw = grid
    x = x.reshape(b, gh, gw, patch_size, patch_size, in_chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, in_chans, gh * patch_size, gw * patch_size)


def mask_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Visible and masked patch indices, each in ascending order: ([B, Nv], [B, Nm]).

    Sorting the unique keys ``mask * N + index`` puts the visible patches first and the masked ones after,
    each in ascending patch order: the same order as the official ``x[~mask]`` / ``x[mask]`` gathers. With
    unique keys any sort is stable, so the ONNX TopK gives the same result, and the masked count stays a
    dynamic size: one exported graph serves any mask ratio. Every row must mask the same number of patches.
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a bool tensor [B, N], got {mask.dtype} {tuple(mask.shape)}")
    n = mask.shape[1]
    num_masked = mask[0].sum()
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        nm = num_masked.item()
        torch._check(nm > 0)
        torch._check(nm < n)
    else:
        counts = mask.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"every row of the mask must mask the same number of patches, got {counts.tolist()}"
            )
        nm = int(num_masked)
        if nm in (0, n):
            raise ValueError(f"the mask must leave at least one patch visible and one masked, got {nm}")
    key = mask.to(torch.int64) * n + torch.arange(n, device=mask.device)
    order = key.argsort(dim=1)
    return order[:, : n - nm], order[:, n - nm :]


READOUTS = ("cls", "mean", "cls+mean", "lastN")


def parse_readout(readout: str, depth: int) -> tuple[str, int]:
    """``cls`` | ``mean`` | ``cls+mean`` | ``last<N>`` (1 <= N <= depth) -> (kind, N)."""
    if readout in ("cls", "mean", "cls+mean"):
        return readout, 1
    if readout.startswith("last") and readout[4:].isdigit() and 1 <= int(readout[4:]) <= depth:
        return "last", int(readout[4:])
    raise ValueError(
        f"readout must be cls, mean, cls+mean or lastN with 1 <= N <= {depth} (e.g. last4), got {readout!r}"
    )


def readout_dim(readout: str, embed_dim: int, depth: int) -> int:
    kind, n = parse_readout(readout, depth)
    return {"cls": 1, "mean": 1, "cls+mean": 2, "last": 2 * n}[kind] * embed_dim


def block_readout(x: Tensor) -> Tensor:
    """[B, 1+n, D] normed tokens -> [B, 2D]: cls, then the mean of the patch tokens."""
    return torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=-1)


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Encoder(nn.Module):
    """The BEiT-style ViT encoder (``encoder.*`` in official checkpoints).

    ``forward(x, mask)`` encodes the patches where ``mask`` is False (plus cls); ``mask=None`` encodes all.
    :meth:`forward_intermediates` is the one token forward (pretraining stages, readouts, the dense
    pyramid and fine-tuning); what downstream training changes is set here too, as timm models do:
    :meth:`set_drop_path` (the stochastic-depth ramp) and :meth:`init_rel_pos_bias` (BEiT's relative
    position tables, built in by ``CAEConfig.use_rel_pos_bias`` or added before fine-tuning).
    """

    def __init__(self, cfg: CAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            embed_dim=d,
            strict_img_size=False,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Fixed sin-cos table, a buffer (never trained, never in the optimizer) but stored in checkpoints.
        self.register_buffer(
            "pos_embed", build_2d_sincos_position_embedding(cfg.grid_size, d), persistent=True
        )
        dpr = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(
            Block(
                d,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                drop_path=dpr[i],
                init_values=cfg.init_values,
                mlp_hidden_dim=cfg.mlp_hidden_dim,
                norm_eps=cfg.norm_eps,
                window_size=cfg.grid_size if cfg.use_rel_pos_bias else None,
            )
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.grad_checkpointing = False

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last block), the downstream
        recipes' setting; 0 turns it off."""
        for blk, r in zip(self.blocks, drop_path_rates(rate, len(self.blocks)), strict=True):
            blk.set_drop_path(r)

    def init_rel_pos_bias(self) -> int:
        """Give every block the official zero-initialized relative position table for the trained grid
        (blocks that have one keep it): the number of blocks that got one. With the tables the encoder
        needs every token (no masking) at ``cfg.img_size``."""
        return sum(bool(blk.attn.init_rel_pos_bias(self.cfg.grid_size)) for blk in self.blocks)

    def embed(self, x: Tensor) -> Tensor:
        """Patch tokens [B, N, D] (no cls, no position)."""
        if x.dim() != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected images [B, {self.cfg.in_chans}, H, W], got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (self.cfg.img_size, self.cfg.img_size):
            raise ValueError(
                f"expected {self.cfg.img_size}x{self.cfg.img_size} images, got {x.shape[-2]}x{x.shape[-1]}"
            )
        return self.patch_embed(x)

    def encode_tokens(self, tokens: Tensor, idx: Tensor | None, final_norm: bool = True) -> Tensor:
        """Run cls + the patch tokens selected by ``idx`` [B, n] (None = all) through the blocks."""
        return self.forward_intermediates(tokens, idx, final_norm=final_norm)[0]

    def forward_intermediates(
        self,
        tokens: Tensor,
        idx: Tensor | None = None,
        indices: Sequence[int] = (),
        final_norm: bool = True,
        pos_embed: Tensor | None = None,
        stop_early: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """As timm's ``forward_intermediates``: the output of the last block run (after the final norm
        unless ``final_norm=False``) and the pre-norm outputs of the blocks listed in ``indices`` (0-based,
        negative from the end), in block order. ``pos_embed``: another position table [1, 1+N, D] (dense
        heads at another input size); ``stop_early``: skip the blocks after the last one asked for."""
        b = tokens.shape[0]
        want = {i % len(self.blocks) for i in indices}
        inter: list[Tensor] = []
        pos = (self.pos_embed if pos_embed is None else pos_embed).to(tokens.dtype)
        if idx is None:
            x, pos_patches = tokens, pos[:, 1:]
        else:
            x = _gather_tokens(tokens, idx)
            pos_patches = _gather_tokens(pos[:, 1:].expand(b, -1, -1), idx)
        x = torch.cat([self.cls_token.expand(b, -1, -1) + pos[:, :1], x + pos_patches], dim=1)
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in want:
                inter.append(x)
                if stop_early and len(inter) == len(want):
                    break
        return (self.norm(x) if final_norm else x), inter

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        tokens = self.embed(x)
        idx = None if mask is None else mask_indices(mask)[0]
        return self.encode_tokens(tokens, idx)


def _decoder_stack(block: type[Block] | type[RegressorBlock], cfg: CAEConfig, depth: int) -> nn.ModuleList:
    """``depth`` blocks of width Dd with the regressor/decoder heads, MLP, layer scale and drop-path ramp."""
    dpr = drop_path_rates(cfg.drop_path_rate, max(depth, 1))
    return nn.ModuleList(
        block(
            cfg.decoder_embed_dim,
            cfg.decoder_num_heads,
            mlp_ratio=cfg.decoder_mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            drop_path=dpr[i],
            init_values=cfg.decoder_layer_scale_init_value,
            mlp_hidden_dim=cfg.decoder_mlp_hidden_dim,
            norm_eps=cfg.norm_eps,
        )
        for i in range(depth)
    )


class Regressor(nn.Module):
    """The latent contextual regressor (``regresser.*`` in official checkpoints)."""

    def __init__(self, cfg: CAEConfig) -> None:
        super().__init__()
        dd = cfg.decoder_embed_dim
        self.regressor_blocks = _decoder_stack(RegressorBlock, cfg, cfg.regressor_depth)
        self.norm = nn.LayerNorm(dd, eps=cfg.norm_eps)

    def forward(self, x_masked: Tensor, x_visible: Tensor, pos_masked: Tensor, pos_visible: Tensor) -> Tensor:
        # K/V = [visible ; current masked estimates]; the visible latents are never updated.
        pos_kv = torch.cat([pos_visible, pos_masked], dim=1)
        for blk in self.regressor_blocks:
            x_masked = blk(x_masked, torch.cat([x_visible, x_masked], dim=1), pos_masked, pos_kv)
        return self.norm(x_masked)


class Decoder(nn.Module):
    """Self-attention blocks over the masked tokens only, then a norm and the pretext head."""

    def __init__(self, cfg: CAEConfig) -> None:
        super().__init__()
        dd = cfg.decoder_embed_dim
        self.decoder_blocks = _decoder_stack(Block, cfg, cfg.decoder_depth)
        self.norm = nn.LayerNorm(dd, eps=cfg.norm_eps)
        self.head = nn.Linear(dd, cfg.pred_dim)

    def forward_features(self, x: Tensor) -> Tensor:
        """The head's input: the blocks, then the norm."""
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class CAE(nn.Module):
    """The CAE pretraining network. Module names match the official state_dict (minus the duplicate
    ``alignment_encoder``), so official weights load without renaming."""

    def __init__(self, cfg: CAEConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = cfg or CAEConfig()
        if overrides:
            cfg = CAEConfig.from_dict({**cfg.to_dict(), **overrides})
        self.cfg = cfg
        dd = cfg.decoder_embed_dim
        if not cfg.encoder_only:
            self.register_buffer("rd_pos_embed", build_2d_sincos_position_embedding(cfg.grid_size, dd))
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        else:
            self.rd_pos_embed = self.mask_token = None
        self.encoder = Encoder(cfg)
        if cfg.encoder_only:
            self.encoder_to_regresser = self.encoder_to_regresser_norm = self.regresser = self.decoder = None
        elif cfg.has_projection:
            self.encoder_to_regresser = nn.Linear(cfg.embed_dim, dd)
            self.encoder_to_regresser_norm = nn.LayerNorm(dd, eps=cfg.norm_eps)
        else:
            self.encoder_to_regresser = None
            self.encoder_to_regresser_norm = None
        if not cfg.encoder_only:
            self.regresser = Regressor(cfg)
            self.decoder = Decoder(cfg)
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """The official effective init: xavier-uniform on every Linear (zero bias), LN 1/0,
        trunc-normal(0.02) on the patch conv, cls and mask tokens, zero q/v biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        conv = self.encoder.patch_embed.proj
        nn.init.trunc_normal_(conv.weight, std=0.02, a=-0.02, b=0.02)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        nn.init.trunc_normal_(self.encoder.cls_token, std=0.02, a=-0.02, b=0.02)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    # ------------------------------------------------------------------ properties
    @property
    def num_patches(self) -> int:
        return self.cfg.num_patches

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    # ------------------------------------------------------------------ stages
    def _project(self, x: Tensor) -> Tensor:
        if self.encoder_to_regresser is None:
            return x
        return self.encoder_to_regresser_norm(self.encoder_to_regresser(x))

    def forward_encoder(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """[B, 1+Nv, D]: cls + visible patches after the final norm (``mask=None``: all patches)."""
        return self.encoder(images, mask)

    def forward_features(self, images: Tensor) -> Tensor:
        """[B, 1+N, D]: every token (cls first) after the final norm, no masking. What the service serves."""
        return self.encoder(images, None)

    def forward_pooled(self, images: Tensor, pooling: Literal["cls", "mean"] = "cls") -> Tensor:
        """[B, D] image features as the official evaluations take them.

        ``cls``: cls token after the final norm (the linear-probe feature).
        ``mean``: final norm of the mean of the *pre-norm* patch tokens (the fine-tuning feature, where
        the pretrained ``norm`` becomes ``fc_norm``).
        """
        if pooling == "cls":
            return self.forward_features(images)[:, 0]
        if pooling == "mean":
            x = self.encoder.encode_tokens(self.encoder.embed(images), None, final_norm=False)
            return self.encoder.norm(x[:, 1:].mean(dim=1))
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")

    def forward_readout(self, images: Tensor, readout: str = "cls") -> Tensor:
        """[B, F] the image embedding named by ``readout`` (:func:`parse_readout`), from the unmasked
        encoder. Every token is taken after the final norm, as served by ``/embed``:

        ``cls`` [D]; ``mean`` [D] mean of the patch tokens; ``cls+mean`` [2D];
        ``lastN`` [2ND] (DINOv2-style) for each of the last N blocks, oldest first, its cls token and the
        mean of its patch tokens, each through the final norm.
        """
        return self.forward_readouts(images, (readout,))[1][readout]

    def forward_readouts(
        self, images: Tensor, readouts: Sequence[str], token_blocks: int = 0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One encoder pass for several readouts: (tokens, {name: [B, F]}). The tokens are the final-norm
        tokens [B, 1+N, D], or with ``token_blocks=n`` those of each of the last n blocks through the final
        norm, concatenated on channels [B, 1+N, n*D], oldest block first (the attentive probe's ``lastN``)."""
        parsed = {r: parse_readout(r, self.cfg.depth) for r in readouts}
        if not 0 <= token_blocks <= self.cfg.depth:
            raise ValueError(f"token_blocks must lie in [0, {self.cfg.depth}], got {token_blocks}")
        deepest = max([n for kind, n in parsed.values() if kind == "last"] + [token_blocks])
        x, inter = self.encoder.forward_intermediates(self.encoder.embed(images), None, range(-deepest, 0))
        cls, mean = x[:, 0], x[:, 1:].mean(dim=1)
        out: dict[str, Tensor] = {}
        for r, (kind, n) in parsed.items():
            if kind == "last":
                out[r] = torch.cat(
                    [block_readout(self.encoder.norm(t)) for t in inter[deepest - n :]], dim=-1
                )
            else:
                out[r] = cls if kind == "cls" else mean if kind == "mean" else torch.cat([cls, mean], dim=-1)
        if token_blocks:
            x = torch.cat([self.encoder.norm(t) for t in inter[deepest - token_blocks :]], dim=-1)
        return x, out

    def forward_embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """What the exported embed graph returns, from one pass: the tokens [B, 1+N, D] after the final
        norm and each block's cls token and patch-token mean through the final norm [B, depth, 2, D]
        (so that every readout, ``lastN`` included, is a slice of the outputs)."""
        x, inter = self.encoder.forward_intermediates(self.encoder.embed(images), None, range(self.cfg.depth))
        blocks = torch.stack(
            [block_readout(self.encoder.norm(t)).unflatten(-1, (2, -1)) for t in inter], dim=1
        )
        return x, blocks

    def forward_block_readouts(self, images: Tensor) -> Tensor:
        """[B, depth, 2, D]: the second output of :meth:`forward_embed`."""
        return self.forward_embed(images)[1]

    def forward_regressor(self, latent_visible: Tensor, mask: Tensor) -> Tensor:
        """Predict the masked patches' latents [B, Nm, Dd] from the visible ones (cls is discarded)."""
        vis_idx, msk_idx = mask_indices(mask)
        b = latent_visible.shape[0]
        x_visible = self._project(latent_visible)[:, 1:]
        pos = self.rd_pos_embed[:, 1:].to(x_visible.dtype).expand(b, -1, -1)
        pos_visible, pos_masked = _gather_tokens(pos, vis_idx), _gather_tokens(pos, msk_idx)
        x_masked = self.mask_token.to(x_visible.dtype).expand(b, msk_idx.shape[1], -1)
        return self.regresser(x_masked, x_visible, pos_masked, pos_visible)

    @torch.no_grad()
    def forward_target(self, images: Tensor, mask: Tensor, tokens: Tensor | None = None) -> Tensor:
        """Alignment target [B, Nm, Dd]: the live encoder with stop-gradient on the masked patches only
        (plus cls, then dropped), projected when the model has the projection. ``tokens`` reuses an
        already computed patch embedding (detached here)."""
        tokens = self.encoder.embed(images) if tokens is None else tokens.detach()
        target = self.encoder.encode_tokens(tokens, mask_indices(mask)[1])[:, 1:]
        return self._project(target).detach()

    def forward_decoder(self, latent_pred: Tensor, mask: Tensor, head: bool = True) -> Tensor:
        """Pretext predictions for the masked patches: [B, Nm, vocab] logits or [B, Nm, p*p*C] pixels
        (``head=False``: the head's input [B, Nm, Dd])."""
        msk_idx = mask_indices(mask)[1]
        pos = self.rd_pos_embed[:, 1:].to(latent_pred.dtype).expand(latent_pred.shape[0], -1, -1)
        x = latent_pred + _gather_tokens(pos, msk_idx)
        return self.decoder(x) if head else self.decoder.forward_features(x)

    def _require_pretext(self) -> None:
        if self.cfg.encoder_only:
            raise ValueError(
                "this model is encoder-only (loaded from an encoder/fine-tuned checkpoint): it has no "
                "regressor or decoder; use forward_features / forward_pooled"
            )

    def forward(
        self, images: Tensor, mask: Tensor | None, keep_blocks: int = 0, head: bool = True
    ) -> CAEOutput:
        """``keep_blocks``: also return the pre-norm outputs of the last N encoder blocks on the visible
        tokens (``CAEOutput.visible_blocks``), for a ``lastN`` readout of the masked view.
        ``head=False`` (training with DALL-E targets): stop before the decoder's head (``pred`` None,
        ``decoded`` set) so that ``forward_loss`` runs head and cross-entropy fused, never materializing
        the [B*Nm, vocab] logits."""
        if mask is None:
            raise ValueError("CAE.forward needs a mask; use forward_features(images) for plain features")
        self._require_pretext()
        tokens = self.encoder.embed(images)
        vis_idx, msk_idx = mask_indices(mask)
        latent_visible, blocks = self.encoder.forward_intermediates(tokens, vis_idx, range(-keep_blocks, 0))
        if self.cfg.arch == "mae":
            out = self._forward_mae(latent_visible, mask, vis_idx, msk_idx)
        else:
            latent_target = self.forward_target(images, mask, tokens=tokens)
            latent_pred = self.forward_regressor(latent_visible, mask)
            dec = self.forward_decoder(latent_pred, mask, head=head)
            out = CAEOutput(latent_visible, latent_pred, latent_target, dec if head else None, mask)
            if not head:
                out.decoded = dec
        out.visible_blocks = blocks
        return out

    def forward_pred(self, images: Tensor, mask: Tensor) -> Tensor:
        """Only the decoder's predictions for the masked patches: no alignment-target pass (inference,
        reconstruction, ONNX export)."""
        self._require_pretext()
        vis_idx, msk_idx = mask_indices(mask)
        latent_visible = self.encoder.encode_tokens(self.encoder.embed(images), vis_idx)
        if self.cfg.arch == "mae":
            return self._forward_mae(latent_visible, mask, vis_idx, msk_idx).predictions(self)
        return self.forward_decoder(self.forward_regressor(latent_visible, mask), mask)

    def _forward_mae(
        self, latent_visible: Tensor, mask: Tensor, vis_idx: Tensor, msk_idx: Tensor
    ) -> CAEOutput:
        """Ablation: MAE-style decoding. Mask tokens and visible latents (with positions) share one
        self-attention decoder; there is no regressor and no alignment target. (The regressor's
        parameters stay in the model, unused, so checkpoints keep one layout.)"""
        b = latent_visible.shape[0]
        x_visible = self._project(latent_visible)[:, 1:]
        pos = self.rd_pos_embed[:, 1:].to(x_visible.dtype).expand(b, -1, -1)
        x_masked = self.mask_token.to(x_visible.dtype).expand(b, msk_idx.shape[1], -1)
        x = torch.cat(
            [x_visible + _gather_tokens(pos, vis_idx), x_masked + _gather_tokens(pos, msk_idx)], dim=1
        )
        for blk in self.decoder.decoder_blocks:
            x = blk(x)
        pred = self.decoder.head(self.decoder.norm(x[:, x_visible.shape[1] :]))
        empty = x.new_zeros(b, msk_idx.shape[1], 0)
        return CAEOutput(latent_visible, empty, empty, pred, mask)

    # ------------------------------------------------------------------ loss
    def pixel_targets(self, images: Tensor, mask: Tensor) -> Tensor:
        """Per-patch targets for the masked patches [B, Nm, p*p*C] (normalized per patch if configured)."""
        target = _gather_tokens(patchify(images, self.cfg.patch_size), mask_indices(mask)[1]).float()
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, out: CAEOutput, target: Tensor) -> dict[str, Tensor]:
        """Loss terms, computed in float32 as officially.

        ``target``: for DALL-E targets the token ids of the whole grid [B, N] (the masked ones are taken
        in ascending order, matching the prediction rows); for pixel targets the (normalized) images
        [B, C, H, W] that were fed to the encoder.
        """
        mask = out.mask
        if self.cfg.target == "dalle":
            if target.dim() != 2 or target.shape != mask.shape:
                raise ValueError(
                    f"token targets must be [B, N] = {tuple(mask.shape)}, got {tuple(target.shape)}"
                )
            labels = _gather_tokens(target.unsqueeze(-1), mask_indices(mask)[1]).squeeze(-1).flatten()
            if out.pred is None and out.decoded is not None:  # head and loss fused (forward head=False)
                h = self.decoder.head
                loss_main, acc = linear_cross_entropy(out.decoded.flatten(0, 1), h.weight, h.bias, labels)
            else:
                logits = out.predictions(self).float().flatten(0, 1)
                loss_main = F.cross_entropy(logits, labels)
                with torch.no_grad():
                    acc = (logits.argmax(-1) == labels).float().mean()
        else:
            tgt = self.pixel_targets(target, mask)
            loss_main = F.mse_loss(out.predictions(self).float(), tgt)
            acc = None
        if out.latent_pred.shape[-1] == 0:  # MAE-style ablation: nothing to align
            loss_align = loss_main.new_zeros(())
        else:
            loss_align = self.cfg.align_loss_weight * F.mse_loss(
                out.latent_pred.float(), out.latent_target.float()
            )
        loss = self.cfg.recon_loss_weight * loss_main + loss_align
        losses = {"loss": loss, "loss_main": loss_main, "loss_align": loss_align}
        if acc is not None:
            losses["mlm_acc"] = acc
        return losses

    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        """Pixel-target models: the image with masked patches replaced by their predictions, in the
        input's (normalized) pixel space. With ``norm_pix_loss`` the model predicts each patch up to its
        mean and variance, so these are taken from the true masked patches (the usual MAE visualization:
        it shows structure, not the patch's average colour, which the model never predicts)."""
        if self.cfg.target != "pixel":
            raise ValueError("reconstruct() needs a pixel-target model; this one predicts DALL-E tokens")
        pred = self.forward_pred(images, mask)
        patches = patchify(images, self.cfg.patch_size)
        msk_idx = mask_indices(mask)[1]
        if self.cfg.norm_pix_loss:
            orig = _gather_tokens(patches, msk_idx)
            mean, var = orig.mean(-1, keepdim=True), orig.var(-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        patches = patches.scatter(
            1, msk_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]), pred.to(patches.dtype)
        )
        return unpatchify(patches, self.cfg.patch_size, self.cfg.grid_size, self.cfg.in_chans)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"img={c.img_size}/{c.patch_size} D={c.embed_dim} depth={c.depth} heads={c.num_heads} "
            f"Dd={c.decoder_embed_dim} reg={c.regressor_depth} dec={c.decoder_depth} target={c.target}"
        )
