"""The attentive probe: a learned query cross-attending over cached token grids, then BN + linear."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.layers import CrossAttention
from ..optim import cosine_lr, effective_warmup
from ..runtime import autocast
from ..tracking import Progress
from .common import pct, shuffled_batches, topk_correct
from .features import Split
from .params import AttentiveParams

__all__ = ["AttentiveBlock", "AttentiveProbe", "run_attentive"]

_logger = logging.getLogger("training.evaluation")


class AttentiveBlock(nn.Module):
    """The official ``AttentiveBlock``: separate LNs on the query, key and value inputs, then
    cross-attention (q/v biases, zero k bias, output projection). No position term, residual or MLP."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm1_k = nn.LayerNorm(dim, eps=norm_eps)
        self.norm1_v = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        if x_q.shape[1] == 1:
            return self.forward_single_query(x_q, x_kv)
        return self.cross_attn(self.norm1_q(x_q), self.norm1_k(x_kv), self.norm1_v(x_kv))

    def forward_single_query(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        """The same function for one query, with the key and value projections moved to the other side of
        the attention sums: q.(W_k x_t) = (W_k^T q).x_t, and sum_t a_t (W_v x_t + b) = W_v (sum_t a_t x_t)
        + b. That is O(T H D + D^2) per image instead of O(T D^2): ~50x fewer FLOPs with 50 tokens, which
        is what makes probes on wide (``tokens=lastN``) grids affordable on a CPU."""
        ca = self.cross_attn
        h, hd = ca.num_heads, ca.head_dim
        dim = x_kv.shape[-1]
        k_in, v_in = self.norm1_k(x_kv), self.norm1_v(x_kv)  # [B, T, D]
        q = F.linear(self.norm1_q(x_q[:, 0]), ca.q.weight, ca.q_bias).view(-1, h, hd)  # [B, H, hd]
        qk = torch.einsum("bhe,hed->bhd", q, ca.k.weight.view(h, hd, dim)) * hd**-0.5  # [B, H, D]
        attn = torch.einsum("bhd,btd->bht", qk, k_in).softmax(dim=-1)
        pooled = torch.einsum("bht,btd->bhd", attn, v_in)  # [B, H, D]
        out = torch.einsum("bhd,hed->bhe", pooled, ca.v.weight.view(h, hd, dim)).reshape(-1, 1, h * hd)
        if ca.v_bias is not None:  # the attention weights sum to one, so the bias passes through
            out = out + ca.v_bias
        return ca.proj(out)


class AttentiveProbe(nn.Module):
    """Learned query [1, 1, D] (zero init) -> AttentiveBlock over all tokens -> BN(affine=False) -> Linear.

    The BatchNorm uses running statistics in eval mode (the released evaluation used batch statistics).
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = AttentiveBlock(dim, num_heads, norm_eps=norm_eps)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        for m in self.block.modules():  # BEiT's _init_weights, which the official model applies
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def pool(self, tokens: Tensor) -> Tensor:
        """[B, T, D] tokens -> [B, D] attention-pooled feature."""
        return self.block(self.query_token.expand(tokens.shape[0], -1, -1), tokens)[:, 0]

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.bn(self.pool(tokens).float()))


def _rows(arr: np.ndarray, idx: np.ndarray) -> Tensor:
    """Rows of a (memory-mapped) array as float32; sorted reads are much faster on a memory map."""
    return torch.from_numpy(np.ascontiguousarray(arr[idx])).float()


def run_attentive(
    p: AttentiveParams,
    tr: Split,
    te: Split,
    nc: int,
    num_heads: int,
    device: torch.device,
    amp: torch.dtype | None,
    seed: int,
) -> dict[str, Any]:
    """Attentive probe on cached token grids (cls + patches after the final norm); no augmentation."""
    torch.manual_seed(seed)
    tokens, labels = tr.features["tokens"], np.asarray(tr.features["labels"])
    n, _, dim = tokens.shape
    probe = AttentiveProbe(dim, num_heads, nc).to(device)
    opt = torch.optim.SGD(
        probe.parameters(), lr=p.lr, momentum=p.momentum, nesterov=True, weight_decay=p.weight_decay
    )
    warmup = effective_warmup(p.warmup_epochs, p.epochs)
    gen = torch.Generator().manual_seed(seed)
    bs = min(p.batch_size, n)
    steps = max(n // bs, 1)
    progress = Progress("attentive probe", p.epochs * steps, unit="step", logger=_logger)
    loss_mean = 0.0
    for epoch in range(p.epochs):
        probe.train()
        loss_sum, count = 0.0, 0
        for it, idx in enumerate(shuffled_batches(n, bs, gen)):
            lr = cosine_lr(epoch + it / steps, p.lr, p.epochs, warmup, p.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            rows = np.sort(idx.numpy())  # a batch is a set: sorting changes nothing but the read speed
            xb, yb = _rows(tokens, rows).to(device), torch.from_numpy(labels[rows]).to(device)
            with autocast(device, amp):
                loss = F.cross_entropy(probe(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, count = loss_sum + float(loss.detach()), count + 1
            progress.update(
                epoch * steps + it + 1,
                extra=f"epoch {epoch + 1}/{p.epochs} loss {loss_sum / count:.4f} lr {lr:.3g}",
            )
        loss_mean = loss_sum / max(count, 1)
    probe.eval()
    test_tokens, yt = te.features["tokens"], torch.from_numpy(np.asarray(te.features["labels"]))
    chunks = []
    with torch.no_grad(), autocast(device, amp):
        for s in range(0, test_tokens.shape[0], p.batch_size):
            rows = np.arange(s, min(s + p.batch_size, test_tokens.shape[0]))
            chunks.append(probe(_rows(test_tokens, rows).to(device)).float().cpu())
    c1, c5 = topk_correct(torch.cat(chunks), yt)
    return {"top1": pct(c1, len(yt)), "top5": pct(c5, len(yt)), "train_loss": round(loss_mean, 6)}
