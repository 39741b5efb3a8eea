"""What the protocols share: top-k accuracy, the per-image vectors of a split, shuffled full batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .features import Split

__all__ = ["pct", "shuffled_batches", "topk_correct", "vectors"]


def topk_correct(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the top k scores, for each k."""
    kmax = min(max(ks), scores.shape[1])
    pred = scores.topk(kmax, dim=1).indices
    hit = pred == labels[:, None]
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def pct(correct: int, n: int) -> float:
    """A percentage, rounded as the results report it."""
    return round(100.0 * correct / max(n, 1), 4)


def vectors(split: Split, feature: str) -> np.ndarray:
    """Per-image vectors for kNN / linear: the cached readout (the cls token for the pixel baseline)."""
    return np.asarray(split.features[feature])


def shuffled_batches(n: int, batch: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Shuffled full batches (drop_last as officially); one batch of everything when n < batch."""
    perm = torch.randperm(n, generator=gen)
    bs = min(batch, n)
    for s in range(0, n - bs + 1, bs):
        yield perm[s : s + bs]
