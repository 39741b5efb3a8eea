"""The kNN protocol: DINO's weighted k-nearest-neighbour vote on cached, L2-normalized features."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import pct, topk_correct, vectors
from .features import Split
from .params import KnnParams

__all__ = ["knn_classify", "run_knn"]


@torch.no_grad()
def knn_classify(
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """DINO's weighted kNN: class scores [M, C] from the k most cosine-similar training features, each
    voting exp(sim / T). Features are L2-normalized here; the similarity matmul runs in chunks."""
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    out = torch.empty(test.shape[0], num_classes)
    for s in range(0, test.shape[0], chunk_size):
        sim = test[s : s + chunk_size] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out[s : s + chunk_size] = votes.cpu()
    return out


def run_knn(p: KnnParams, tr: Split, te: Split, nc: int, device: torch.device) -> dict[str, Any]:
    scores = knn_classify(
        torch.from_numpy(vectors(tr, p.feature)).to(device),
        torch.from_numpy(tr.features["labels"]).to(device),
        torch.from_numpy(vectors(te, p.feature)).to(device),
        nc,
        k=p.k,
        temperature=p.temperature,
        chunk_size=p.chunk_size,
    )
    labels = torch.from_numpy(te.features["labels"])
    c1, c5 = topk_correct(scores, labels)
    return {"top1": pct(c1, len(labels)), "top5": pct(c5, len(labels)), "train_loss": None}
