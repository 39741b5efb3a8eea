"""Instance-level objective beside CAE's masked modeling: an extension, off in the official presets.

Pixel MIM at small scale learns pixel-like features; nothing in it supervises the cls token. This adds a
SimCLR/MSN-style term: a readout (``instance.pooling``: cls, mean, or the served ``lastN``) of the *masked*
view the CAE step already encodes is contrasted (InfoNCE through a projection head) against the same
readout of a second, independently augmented, unmasked view of the same image. The masked view acts as a
strong augmentation (as in MSN), so the extra cost is one unmasked encoder pass per sample.

``instance.kind=nn_contrastive`` is MAE-CT's choice (NNCLR's loss): each view's positive is the nearest
neighbour of the other view's embedding in a support queue of recent unmasked-view embeddings, so images
that the encoder already finds alike are pulled together (what a kNN readout rewards), not only two
crops of one image. Until the queue is full the plain InfoNCE is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.cae import block_readout

if TYPE_CHECKING:
    from .models.cae import CAE, CAEOutput


class SupportQueue(nn.Module):
    """NNCLR's support set: the last ``size`` unmasked-view embeddings (L2-normalized, float32, no grad).
    Buffers, so a checkpoint of the head carries it and ``--resume`` continues with the same neighbours."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"instance.queue_size must be >= 1, got {size}")
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))  # embeddings pushed so far

    @property
    def full(self) -> bool:
        return int(self.pushed) >= self.feats.shape[0]

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """Each row of ``z`` (normalized) replaced by its nearest (cosine) queue entry."""
        return self.feats[(z @ self.feats.t()).argmax(dim=1)]

    @torch.no_grad()
    def push(self, z: Tensor) -> None:
        size, b = self.feats.shape[0], z.shape[0]
        rows = (torch.arange(b, device=z.device) + int(self.pushed)) % size
        self.feats[rows[-size:]] = z[-size:].to(self.feats.dtype)
        self.pushed += b


class ProjectionHead(nn.Module):
    """SimCLR's 3-layer MLP with batch norm; only used for the loss, never exported. ``queue``: the support
    set of the nearest-neighbour variant (None for plain InfoNCE)."""

    def __init__(self, dim: int, hidden_dim: int = 1024, out_dim: int = 128, queue_size: int = 0) -> None:
        super().__init__()
        self.queue = SupportQueue(queue_size, out_dim) if queue_size else None
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def info_nce(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Symmetric NT-Xent over 2B embeddings (each row's positive is its other view, the 2B-2 others are
    negatives), in float32. Returns (loss, top-1 accuracy of finding the positive)."""
    z = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=-1)
    b = z1.shape[0]
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    loss = F.cross_entropy(logits, targets)
    with torch.no_grad():
        acc = (logits.argmax(dim=1) == targets).float().mean()
    return loss, acc


def nn_info_nce(z1: Tensor, z2: Tensor, queue: SupportQueue, temperature: float) -> tuple[Tensor, Tensor]:
    """NNCLR's symmetric loss: row i of ``z1`` must pick, among the batch's ``z2``, the one whose image
    gave the support neighbour NN(z2_i) ... and vice versa; then the ``z2`` embeddings join the queue.
    Plain :func:`info_nce` until the queue is full. Returns (loss, top-1 accuracy)."""
    z1n, z2n = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    if not queue.full:
        loss, acc = info_nce(z1n, z2n, temperature)  # its own normalization is a no-op on unit rows
    else:
        targets = torch.arange(z1.shape[0], device=z1.device)
        logits_a = queue.nearest(z2n) @ z1n.t() / temperature  # NN(z2_i) . z1_j
        logits_b = queue.nearest(z1n) @ z2n.t() / temperature
        loss = 0.5 * (F.cross_entropy(logits_a, targets) + F.cross_entropy(logits_b, targets))
        with torch.no_grad():
            acc = (logits_a.argmax(dim=1) == targets).float().mean()
    queue.push(z2n.detach())
    return loss, acc


def instance_readout_blocks(pooling: str, depth: int) -> int:
    """How many of the last blocks' outputs the masked view must keep for ``pooling`` (0 unless lastN)."""
    from .models.cae import parse_readout

    kind, n = parse_readout(pooling, depth)
    if kind == "cls+mean":
        raise ValueError(f"instance.pooling must be cls, mean or lastN, got {pooling!r}")
    return n if kind == "last" else 0


def build_instance_head(
    model: CAE, pooling: str, hidden_dim: int, proj_dim: int, queue_size: int = 0
) -> ProjectionHead:
    """The projection head for ``pooling``'s readout of ``model`` (its width: :func:`readout_dim`), with a
    support queue of ``queue_size`` embeddings for the nearest-neighbour variant (0: none).
    Raises ValueError for a pooling the instance term cannot use on this depth."""
    from .models.cae import readout_dim

    instance_readout_blocks(pooling, model.cfg.depth)
    width = readout_dim(pooling, model.embed_dim, model.cfg.depth)
    return ProjectionHead(width, hidden_dim, proj_dim, queue_size=queue_size)


def masked_view_feature(out: CAEOutput, model: CAE, pooling: str) -> Tensor:
    """The readout ``pooling`` (cls | mean | lastN, as :meth:`CAE.forward_readout` names them) of the masked
    view that the CAE step already encoded: the visible patches stand in for all of them."""
    if pooling == "cls":
        return out.latent_visible[:, 0]
    if pooling == "mean":
        return out.latent_visible[:, 1:].mean(dim=1)
    n = instance_readout_blocks(pooling, model.cfg.depth)
    if len(out.visible_blocks) != n:
        raise ValueError(
            f"instance.pooling={pooling} needs the last {n} blocks of the masked view, "
            f"got {len(out.visible_blocks)} (CAE.forward keep_blocks)"
        )
    return torch.cat([block_readout(model.encoder.norm(t)) for t in out.visible_blocks], dim=-1)
