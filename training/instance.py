"""Instance-level objective beside CAE's masked modeling: an extension, off in the official presets.

Pixel MIM at small scale learns pixel-like features; nothing in it supervises the cls token. This adds a
SimCLR/MSN-style term: the cls token of the *masked* view the CAE step already encodes is contrasted
(InfoNCE through a projection head) against the cls token of a second, independently augmented,
unmasked view of the same image. The masked view acts as a strong augmentation (as in MSN), so the
extra cost is one unmasked encoder pass per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """SimCLR's 3-layer MLP with batch norm; only used for the loss, never exported."""

    def __init__(self, dim: int, hidden_dim: int = 1024, out_dim: int = 128) -> None:
        super().__init__()
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


def pooled(tokens: Tensor, pooling: str) -> Tensor:
    """[B, 1+n, D] post-norm tokens -> [B, D] (``cls`` or ``mean`` of the patch tokens)."""
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"instance.pooling must be 'cls' or 'mean', got {pooling!r}")
