"""Building blocks of the CAE network, with the official parameter names.

Parameter names follow the authors' code (``attn.qkv.weight`` + ``attn.q_bias``/``attn.v_bias``,
``gamma_1``/``gamma_2``, ``regressor_blocks.{j}.norm1_q`` ...), so an official state_dict maps onto ours
without renaming. Generic pieces (MLP, drop path, patch embedding) come from ``timm.layers``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "CrossAttention",
    "PatchEmbed",
    "RegressorBlock",
    "build_2d_sincos_position_embedding",
    "drop_path_rates",
    "relative_position_index",
    "resample_abs_pos_embed",
]


def build_2d_sincos_position_embedding(
    grid_size: int | tuple[int, int], embed_dim: int, temperature: float = 10000.0, cls_token: bool = True
) -> Tensor:
    """Fixed 2-D sin-cos table [1, (1+)H*W, D] exactly as the official code builds it.

    The official code names the first coordinate "w", but because it calls ``meshgrid(grid_w, grid_h)``
    with 'ij' indexing it is the patch *row*: channels are [sin(r w), cos(r w), sin(c w), cos(c w)].
    The cls row is zeros.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos table, got {embed_dim}")
    # Same float32 arithmetic and op order as the reference, so the table is bit-identical on the same
    # vector unit (torch's vectorized sin/cos differ by 1 ulp between AVX2 and AVX-512).
    grid_r = torch.arange(gh, dtype=torch.float32)
    grid_c = torch.arange(gw, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid_r, grid_c, indexing="ij")
    pos_dim = embed_dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_r = torch.einsum("m,d->md", rows.flatten(), omega)
    out_c = torch.einsum("m,d->md", cols.flatten(), omega)
    table = torch.cat([torch.sin(out_r), torch.cos(out_r), torch.sin(out_c), torch.cos(out_c)], dim=1)[None]
    if cls_token:
        table = torch.cat([torch.zeros(1, 1, embed_dim), table], dim=1)
    return table


def resample_abs_pos_embed(
    pos_embed: Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> Tensor:
    """Bicubically resize a square position table [1, P+N, D] to ``new_grid`` (the downstream-task rule)."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, d = grid.shape[1], grid.shape[2]
    old = int(math.isqrt(n))
    if old * old != n:
        raise ValueError(f"position table with {n} patch rows is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """The stochastic-depth ramp: ``depth`` rates from 0 to ``rate``, linearly (block 0 never drops)."""
    return torch.linspace(0, rate, depth).tolist()


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


# "explicit" | "sdpa": how :func:`attention` runs bf16/fp16 on the CPU (the bench flips it to compare both)
CPU_ATTENTION = "explicit"


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v written out (two batched matmuls and a softmax), as the official
    BEiT/CAE code computes it."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Multi-head attention over [B, H, T, d] heads, with an optional additive ``bias``.

    bf16/fp16 on the CPU runs :func:`explicit_attention`: for the short sequences of this project's models
    (26-50 tokens; also at 197) PyTorch's CPU flash kernel is 1.5-4x slower forward + backward there, and
    the bf16 training step 1.26-1.43x slower (``bench/train_throughput.py --compare-attention``). fp32 on
    the CPU (where the fused kernel measured 1.08-1.25x faster), GPUs and ONNX export keep
    ``scaled_dot_product_attention`` (the exported graphs stay as they were)."""
    explicit = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
    if not explicit or CPU_ATTENTION == "sdpa" or torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    return explicit_attention(q, k, v, bias, dropout_p)


class Attention(nn.Module):
    """BEiT self-attention: ``qkv`` without bias plus separate ``q_bias``/``v_bias`` (k bias is zero).

    ``head_dim`` defaults to ``dim // num_heads``; the attention width is ``num_heads * head_dim``, which
    is smaller than ``dim`` when it does not divide (the official Dd=1024 / 12-head case gives 1020).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        head_dim: int | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        all_head_dim = self.head_dim * num_heads
        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # BEiT relative position bias, only for fine-tuned official checkpoints and fine-tuning
        # (pretraining has none).
        self.window_size: tuple[int, int] | None = None
        self.relative_position_bias_table: nn.Parameter | None = None
        if window_size is not None:
            self.init_rel_pos_bias(window_size)

    def init_rel_pos_bias(self, window_size: tuple[int, int]) -> bool:
        """Add the official zero-initialized relative position table for a ``window_size`` patch grid (on
        the device of the weights); False, and nothing changes, when the attention already has one."""
        if self.relative_position_bias_table is not None:
            return False
        num_rel = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
        dev = self.qkv.weight.device
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, self.num_heads, device=dev))
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size).to(dev), persistent=False
        )
        return True

    def rel_pos_bias(self) -> Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))
        attn_bias = None
        if self.relative_position_bias_table is not None:
            if x.shape[1] != self.relative_position_index.shape[0]:
                raise ValueError(
                    "relative position bias needs all tokens (no masking, the trained image size)"
                )
            attn_bias = self.rel_pos_bias().to(q.dtype)
        x = attention(q, k, v, attn_bias, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(_merge_heads(x)))


def relative_position_index(window_size: tuple[int, int]) -> Tensor:
    """BEiT's [N+1, N+1] index into the relative-position table (3 extra entries for cls rows/cols)."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    num_rel = (2 * wh - 1) * (2 * ww - 1) + 3
    index = torch.zeros(wh * ww + 1, wh * ww + 1, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_rel - 3
    index[0:, 0] = num_rel - 2
    index[0, 0] = num_rel - 1
    return index


class Block(nn.Module):
    """Pre-norm transformer block with BEiT layer scale (``gamma_1``/``gamma_2``; absent if init is 0)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        head_dim: int | None = None,
        mlp_hidden_dim: int | None = None,
        norm_eps: float = 1e-6,
        window_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, head_dim=head_dim, window_size=window_size
        )
        self.set_drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        hidden = mlp_hidden_dim or int(dim * mlp_ratio)
        self.mlp = Mlp(in_features=dim, hidden_features=hidden, act_layer=nn.GELU)
        if init_values is not None and init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth on both residual branches at ``rate`` (0: none)."""
        self.drop_path = DropPath(rate) if rate > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class CrossAttention(nn.Module):
    """Cross-attention with separate ``q``/``k``/``v`` projections, q/v biases and a zero k bias."""

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, head_dim: int | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        all_head_dim = self.head_dim * num_heads
        self.q = nn.Linear(dim, all_head_dim, bias=False)
        self.k = nn.Linear(dim, all_head_dim, bias=False)
        self.v = nn.Linear(dim, all_head_dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(all_head_dim, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = _split_heads(F.linear(q, self.q.weight, self.q_bias), self.num_heads)
        k = _split_heads(F.linear(k, self.k.weight), self.num_heads)
        v = _split_heads(F.linear(v, self.v.weight, self.v_bias), self.num_heads)
        return self.proj(_merge_heads(attention(q, k, v)))


class RegressorBlock(nn.Module):
    """The latent contextual regressor's block, exactly as the official ``RegressorBlock``.

    Queries carry positions, keys carry positions, values do not; Q, K and V each get their own LN; the
    second LN (``norm2_cross``) is a *post*-norm applied to the residual stream before the MLP residual.
    The layer-scale keys always exist (constant ones when the init value is <= 0, as officially).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float = 0.1,
        head_dim: int | None = None,
        mlp_hidden_dim: int | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm1_k = nn.LayerNorm(dim, eps=norm_eps)
        self.norm1_v = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2_cross = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, head_dim=head_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        hidden = mlp_hidden_dim or int(dim * mlp_ratio)
        self.mlp_cross = Mlp(in_features=dim, hidden_features=hidden, act_layer=nn.GELU)
        trainable = init_values > 0
        value = init_values if trainable else 1.0
        self.gamma_1_cross = nn.Parameter(value * torch.ones(dim), requires_grad=trainable)
        self.gamma_2_cross = nn.Parameter(value * torch.ones(dim), requires_grad=trainable)

    def forward(self, x_q: Tensor, x_kv: Tensor, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        attn = self.cross_attn(self.norm1_q(x_q + pos_q), self.norm1_k(x_kv + pos_k), self.norm1_v(x_kv))
        x = x_q + self.drop_path(self.gamma_1_cross * attn)
        x = self.norm2_cross(x)
        return x + self.drop_path(self.gamma_2_cross * self.mlp_cross(x))
