"""Fused vocabulary head + cross-entropy for DALL-E token targets.

CAE's decoder ends in a Linear(Dd, 8192) over every masked patch, and its loss is a cross-entropy over
those 8192 logits. Materialized, the logits of a batch are [B*Nm, 8192] floats (67 MB at batch 64 on the
fixture config): log-softmax, its backward, the one-hot gradient and the accuracy's argmax each stream
that buffer through memory, and on a CPU that costs as much as the head's matmuls. Here the logits of
``chunk`` rows at a time stay in cache: forward computes the loss, the accuracy (from the same row max)
and the gradients of the input, weight and bias in one pass (as Liger's fused linear cross-entropy does),
and backward only scales them. Same values as ``F.cross_entropy(h @ W.T + b, labels)`` (mean) in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["linear_cross_entropy"]


def _default_chunk(vocab: int) -> int:
    # about 8 MB of float32 logits per chunk (256 rows at 8192): in L3 on current CPUs, and tall enough
    # that the chunk GEMMs (K = Dd, and K = rows for the weight gradient) stay efficient; measured on
    # Zen 4 at 8192 x 96: 64 rows 294 ms, 256 rows 237 ms, unchunked 228 ms (fwd+bwd, 2048 rows)
    return max(16, min(4096, (2 * 1024 * 1024) // max(vocab, 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int, grads: bool
    ) -> tuple[Tensor, Tensor]:
        n = h.shape[0]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight)
        grad_b = torch.zeros_like(bias) if bias is not None else None
        loss = h.new_zeros((), dtype=torch.float64)
        correct = h.new_zeros((), dtype=torch.long)
        inv_n = 1.0 / n
        w_t = weight.t()
        for s in range(0, n, chunk):
            hc, lab = h[s : s + chunk], labels[s : s + chunk]
            rows = torch.arange(hc.shape[0], device=h.device)
            logits = torch.addmm(bias, hc, w_t) if bias is not None else hc @ w_t
            top, pred = logits.max(dim=1)
            target_logit = logits[rows, lab]
            correct += (pred == lab).sum()
            logits.sub_(top.unsqueeze(1)).exp_()
            sumexp = logits.sum(dim=1)
            loss += (sumexp.log() + top - target_logit).sum(dtype=torch.float64)
            if not grads:  # evaluation: the loss only
                continue
            # d(mean CE)/d logits = (softmax - onehot) / n, built in place of the logits
            logits.mul_((inv_n / sumexp).unsqueeze(1))
            logits[rows, lab] -= inv_n
            grad_h[s : s + chunk] = logits @ weight
            grad_w.addmm_(logits.t(), hc)
            if grad_b is not None:
                grad_b += logits.sum(dim=0)
        ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else h.new_empty(0))
        ctx.has_bias = bias is not None
        acc = correct.to(h.dtype) * inv_n
        ctx.mark_non_differentiable(acc)
        return (loss * inv_n).to(h.dtype), acc

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_acc: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (
            grad_h * grad_loss,
            grad_w * grad_loss,
            grad_b * grad_loss if ctx.has_bias else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of ``h @ weight.T + bias`` against ``labels`` and the top-1 accuracy, without
    materializing the logits. ``h`` [N, D], ``weight`` [V, D], ``bias`` [V] or None, ``labels`` [N] int.
    Computed in float32 whatever the inputs' dtype (the official loss is float32)."""
    if h.dim() != 2 or labels.shape != h.shape[:1]:
        raise ValueError(f"h must be [N, D] and labels [N], got {tuple(h.shape)} and {tuple(labels.shape)}")
    if h.shape[0] == 0:
        raise ValueError("linear_cross_entropy needs at least one row")
    w = weight.float()
    b = bias.float() if bias is not None else None
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    return _LinearCrossEntropy.apply(h.float(), w, b, labels, chunk or _default_chunk(weight.shape[0]), grads)
