"""Turning graph outputs into what the routes return: pooled embeddings, reconstructed images, PNGs.

Reconstruction de-normalization (pixel-target bundles). The graph predicts each masked patch as a
``p*p*C`` vector in (row, col, channel) order, in the normalized input space. With ``norm_pix_loss`` the
model was trained on per-patch standardized targets, so a prediction only carries the patch's structure;
like the MAE visualization, each predicted patch is mapped back with the *original* patch's mean and
unbiased variance, ``pred * sqrt(var + 1e-6) + mean`` (exactly ``CAE.reconstruct``). The image is then
de-normalized with the dataset ``mean``/``std`` of the bundle, ``x * std + mean``, clipped to [0, 1].
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from .bundle import ImageSpec

_GREY = 0.5  # masked cells are shown mid-grey (0 in normalized space would be the dataset mean colour)


def pool(tokens: np.ndarray, pooling: str, blocks: np.ndarray | None = None) -> np.ndarray:
    """[n, 1+N, D] tokens after the final norm -> [n, D] (cls, mean of patch tokens), [n, 2D] (cls+mean),
    [n, N, D] (none); ``lastN`` -> [n, 2ND] from ``blocks`` [n, depth, 2, D] (each block's cls and patch
    mean through the final norm, oldest first), exactly ``CAE.forward_readout``."""
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "mean":
        return tokens[:, 1:].mean(axis=1)
    if pooling == "cls+mean":
        return np.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)
    if pooling.startswith("last"):
        if blocks is None:
            raise ValueError(f"pooling {pooling} needs the embed graph's block_readouts output")
        n = int(pooling[4:])
        return np.ascontiguousarray(blocks[:, -n:]).reshape(len(blocks), -1)
    return tokens[:, 1:]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def patchify(x: np.ndarray, p: int) -> np.ndarray:
    """[C, H, W] -> [N, p*p*C], row-major patches, (row, col, channel) inside a patch (as the model)."""
    c, h, w = x.shape
    return x.reshape(c, h // p, p, w // p, p).transpose(1, 3, 2, 4, 0).reshape((h // p) * (w // p), p * p * c)


def unpatchify(patches: np.ndarray, p: int, grid: tuple[int, int], c: int) -> np.ndarray:
    gh, gw = grid
    return patches.reshape(gh, gw, p, p, c).transpose(4, 0, 2, 1, 3).reshape(c, gh * p, gw * p)


def random_mask(num_patches: int, ratio: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(ratio * N)`` masked patches (at least 1, at most N - 1)."""
    n = min(num_patches - 1, max(1, int(round(ratio * num_patches))))
    return np.sort(np.random.default_rng(seed).choice(num_patches, n, replace=False))


def reconstruct(
    x: np.ndarray, masked: np.ndarray, pred: np.ndarray, spec: ImageSpec, norm_pix: bool
) -> np.ndarray:
    """The normalized input [C, H, W] with the masked patches (sorted indices) replaced by ``pred``
    [Nm, p*p*C], de-normalized per patch when the model predicts standardized patches."""
    p = spec.patch_size
    patches = patchify(x.astype(np.float32), p)
    pred = pred.astype(np.float32)
    if norm_pix:
        orig = patches[masked]
        mean = orig.mean(axis=-1, keepdims=True)
        var = orig.var(axis=-1, ddof=1, keepdims=True)  # unbiased, as torch's var in training
        pred = pred * np.sqrt(var + 1.0e-6) + mean
    out = patches.copy()
    out[masked] = pred
    return unpatchify(out, p, spec.grid, spec.channels)


def masked_view(x: np.ndarray, masked: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """The normalized input with masked patches set to mid-grey."""
    p, c = spec.patch_size, spec.channels
    grey = (_GREY - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    patches = patchify(x.astype(np.float32), p)
    patches[masked] = np.tile(grey, p * p)  # (row, col, channel) order: channel fastest
    return unpatchify(patches, p, spec.grid, c)


def per_patch_mse(x: np.ndarray, rec: np.ndarray, masked: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """MSE per masked patch between reconstruction and input, in [0, 1] pixel units."""
    p = spec.patch_size
    std = np.tile(np.asarray(spec.std, np.float32), p * p)
    diff = (patchify(rec, p)[masked] - patchify(x, p)[masked]) * std
    return (diff**2).mean(axis=-1)


def to_uint8(x: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Normalized [C, H, W] -> uint8 [H, W, C] (or [H, W] for one channel)."""
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    y = np.rint(np.clip(x * std + mean, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
    return y[:, :, 0] if y.shape[2] == 1 else y


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # fast: these are small, one-off images
    return buf.getvalue()


def b64png(arr: np.ndarray) -> str:
    return base64.b64encode(png(arr)).decode("ascii")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()
