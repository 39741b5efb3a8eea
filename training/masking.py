"""Mask generators for CAE pretraining (as the official ``furnace/masking_generator.py``).

Numpy only: these run inside data-loader workers, which should not pay for importing torch.

* :class:`BlockMaskingGenerator` reimplements the official BEiT/CAE block-wise ``MaskingGenerator``.
  With ``random.Random(seed)`` it consumes random numbers in exactly the official order, so it gives
  the official masks bit for bit (the official code uses the module-level ``random`` after
  ``random.seed(seed)``, which is the same stream).
* :class:`RandomMaskingGenerator` masks a uniformly random set of exactly N patches.

Every generator returns an int8 [H, W] array with 1 = masked and *exactly* ``num_masking_patches``
ones, because the model gathers the masked tokens with a boolean index and reshapes them to
[B, N_m, C], which needs the same N_m in every row. :func:`masks_to_bool` flattens a batch row-major
(index = r * W + c) to the bool [B, H*W] layout the training loop uses.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "BlockMaskingGenerator",
    "RandomMaskingGenerator",
    "build_mask_generator",
    "masks_to_bool",
    "MASK_KINDS",
]

MASK_KINDS: tuple[str, ...] = ("block", "random")

# The official code makes at most 10 attempts per round.
_ATTEMPTS_PER_ROUND = 10
# The official CAE loop retries failed rounds forever. We allow this many failed rounds in a row
# before filling the rest at random; in the configs we use (14x14/98, 14x14/75, 8x8/32) a run of even
# 10 failed rounds is rare, so this cap never changes a mask the official code would return.
_MAX_FAILED_ROUNDS = 1000


def _as_grid(input_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise ``input_size`` (int or (height, width)) and check it is a positive grid."""
    if isinstance(input_size, (int, np.integer)):
        height = width = int(input_size)
    else:
        try:
            height, width = (int(v) for v in input_size)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"input_size must be an int or a (height, width) pair, got {input_size!r}"
            ) from exc
    if height <= 0 or width <= 0:
        raise ValueError(f"input_size must be positive, got ({height}, {width})")
    return height, width


def _check_count(num_masking_patches: Any, num_patches: int) -> int:
    if isinstance(num_masking_patches, bool) or not isinstance(num_masking_patches, (int, np.integer)):
        raise ValueError(f"num_masking_patches must be an int, got {num_masking_patches!r}")
    if not 0 < num_masking_patches <= num_patches:
        raise ValueError(
            f"num_masking_patches must be in [1, {num_patches}] (the number of patches), "
            f"got {num_masking_patches}"
        )
    return int(num_masking_patches)


def _count_from_ratio(mask_ratio: float, num_patches: int) -> int:
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    # int() truncation as in the official RandomMaskingGenerator: int(0.75 * 196) == 147.
    count = int(mask_ratio * num_patches)
    if count == 0:
        raise ValueError(f"mask_ratio={mask_ratio} masks no patch of a grid of {num_patches} patches")
    return count


def _block_can_fit(
    height: int, width: int, area_range: tuple[float, float], log_aspect: tuple[float, float], budget: int
) -> bool:
    """Whether an attempt on an empty grid can succeed: some block 1 <= h*w <= budget, h < height,
    w < width, is reachable from area in ``area_range`` and log-aspect in ``log_aspect``.

    With x = sqrt(area * a), y = sqrt(area / a), a block (h, w) needs x in [h - .5, h + .5) and
    y in [w - .5, w + .5). In u = log x, v = log y that is a rectangle, and p = u + v = log(area),
    q = u - v = log(a) must lie in their ranges; eliminating p leaves an interval test on q.
    (Closed intervals: a measure-zero touch counts as feasible; the run-time fallback covers it.)
    """
    s0, s1 = math.log(area_range[0]), math.log(area_range[1])
    t0, t1 = log_aspect
    for h in range(1, height):
        for w in range(1, width):
            if h * w > budget:
                break
            u0, u1 = math.log(h - 0.5), math.log(h + 0.5)
            v0, v1 = math.log(w - 0.5), math.log(w + 0.5)
            q_lo = max(t0, s0 - 2 * v1, 2 * u0 - s1, u0 - v1)
            q_hi = min(t1, 2 * u1 - s0, s1 - 2 * v0, u1 - v0)
            if q_lo <= q_hi:
                return True
    return False


class BlockMaskingGenerator:
    """Block-wise masking, a faithful reimplementation of the official BEiT/CAE ``MaskingGenerator``.

    Each round makes up to 10 attempts: area ~ U[min_num_patches, rem], aspect log-uniform in
    [min_aspect, max_aspect], h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); a block
    is tried only if h < height and w < width (strict), at a uniform top-left corner, and kept iff the
    number of *new* patches delta satisfies 0 < delta <= rem, where rem = min(target - count,
    max_num_patches). The round stops at the first attempt that adds patches.

    Randomness: ``rng`` (a ``random.Random``) or ``seed`` (-> ``random.Random(seed)``); with neither,
    the module-level ``random`` is used, exactly as the official code does. That default is safe in
    data-loader workers, because both Python (at fork) and torch's DataLoader reseed the module-level
    ``random`` per worker; an explicit ``seed`` is *not* reseeded, so give each worker its own
    (e.g. ``reseed(base_seed + worker_id)`` in ``worker_init_fn``).

    Exact count: the official CAE loop (``while mask_count != num_masking_patches``) simply retries
    failed rounds; BEiT's variant ``break``s instead and can return fewer patches. We keep retrying
    rounds with the same stream, which is exactly CAE's behaviour, and only after
    ``_MAX_FAILED_ROUNDS`` failed rounds in a row (where CAE would still be looping, perhaps forever)
    fill the remainder with random unmasked cells. So the output differs from the official one only
    where the official code would have hung (CAE) or returned a wrong count (BEiT).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        seed: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.height, self.width = _as_grid(input_size)
        self.num_patches = self.height * self.width
        if self.height < 2 or self.width < 2:
            # Blocks need h < height and w < width, so a 1-wide grid only admits empty blocks: the
            # official code would loop forever.
            raise ValueError(
                f"block masking needs a grid of at least 2x2 (blocks must be strictly smaller than the "
                f"grid), got {self.height}x{self.width}; use kind='random' instead"
            )
        self.num_masking_patches = _check_count(num_masking_patches, self.num_patches)
        if isinstance(min_num_patches, bool) or not isinstance(min_num_patches, (int, np.integer)):
            raise ValueError(f"min_num_patches must be an int, got {min_num_patches!r}")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        # min_num_patches > num_masking_patches is allowed, as in the official code: uniform(a, b)
        # with a > b still draws from [b, a], and overlapping blocks can add few new patches.
        self.min_num_patches = int(min_num_patches)
        if max_num_patches is None:
            max_num_patches = self.num_masking_patches
        if max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1 (or None), got {max_num_patches}")
        self.max_num_patches = int(max_num_patches)
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        # `or` as in the official code: max_aspect=None (or 0) means 1 / min_aspect.
        max_aspect = max_aspect or 1.0 / min_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect})")
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

        # Reject configs whose very first round can never place a block (the official code would
        # loop forever). Later rounds can overlap earlier blocks, so they are left to the fallback.
        budget = min(self.num_masking_patches, self.max_num_patches)
        area_range = (min(self.min_num_patches, budget), max(self.min_num_patches, budget))
        if not _block_can_fit(self.height, self.width, area_range, self.log_aspect_ratio, budget):
            raise ValueError(
                f"block masking cannot place any block: areas in [{area_range[0]}, {area_range[1]}] with "
                f"aspect in [{self.min_aspect:.3g}, {self.max_aspect:.3g}] never give a block of at most "
                f"{budget} patches that is strictly smaller than the {self.height}x{self.width} grid; "
                f"lower min_num_patches or use kind='random'"
            )

        if rng is not None and seed is not None:
            raise ValueError("pass either seed or rng, not both")
        self._rng: random.Random | ModuleType
        if rng is not None:
            self._rng = rng
        elif seed is not None:
            self._rng = random.Random(seed)
        else:
            self._rng = random
        self.num_fallback_fills = 0

    def reseed(self, seed: int) -> None:
        """Switch to a fresh ``random.Random(seed)`` (e.g. ``base_seed + worker_id`` per worker)."""
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        # Same fields as the official repr, whose "max" is the total count.
        lo, hi = self.log_aspect_ratio
        return (
            f"BlockMaskingGenerator({self.height}, {self.width} -> [{self.min_num_patches} ~ "
            f"{self.max_num_patches}], max = {self.num_masking_patches}, {lo:.3f} ~ {hi:.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: int) -> int:
        """One official round: up to 10 attempts; returns the number of patches added (0 = failed)."""
        rng = self._rng
        height, width = self.height, self.width
        lo, hi = self.log_aspect_ratio
        for _ in range(_ATTEMPTS_PER_ROUND):
            # The order of the rng calls below is the official one; changing it breaks reproduction.
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(lo, hi))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                block = mask[top : top + h, left : left + w]
                delta = h * w - int(block.sum())
                # Official acceptance: only the *new* patches count against the budget.
                if 0 < delta <= max_mask_patches:
                    block[...] = 1
                    return delta
        return 0

    def _fill_random(self, mask: np.ndarray, missing: int) -> None:
        """Last resort: mask ``missing`` random unmasked cells (drawn from the same rng)."""
        free = np.flatnonzero(mask.reshape(-1) == 0).tolist()
        chosen = self._rng.sample(free, missing)
        mask.reshape(-1)[chosen] = 1
        self.num_fallback_fills += 1
        if self.num_fallback_fills == 1:
            logger.warning(
                "%r: %d failed rounds in a row; filled %d remaining patches at random to keep the "
                "count exact (the official code would still be looping here)",
                self,
                _MAX_FAILED_ROUNDS,
                missing,
            )

    def __call__(self) -> np.ndarray:
        """Return an int8 [H, W] mask (1 = masked) with exactly ``num_masking_patches`` ones."""
        mask = np.zeros((self.height, self.width), dtype=np.int8)
        mask_count = 0
        failed_rounds = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                # BEiT breaks here (wrong count); CAE retries. We retry, then fall back.
                failed_rounds += 1
                if failed_rounds >= _MAX_FAILED_ROUNDS:
                    self._fill_random(mask, self.num_masking_patches - mask_count)
                    break
            else:
                failed_rounds = 0
                mask_count += delta
        return mask


class RandomMaskingGenerator:
    """Uniformly random masking of exactly ``num_masking_patches`` patches (numpy ``Generator``).

    Give either ``num_masking_patches`` or ``mask_ratio`` (count = int(mask_ratio * H * W), as in the
    official ``RandomMaskingGenerator``). Unlike the official one (a flat float array) this returns
    an int8 [H, W] array, like the block generator.

    With ``seed=None`` the generator is drawn from OS entropy and redrawn in any new process, so
    forked data-loader workers (which torch does not reseed for numpy) never share a mask stream.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        mask_ratio: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.height, self.width = _as_grid(input_size)
        self.num_patches = self.height * self.width
        if (num_masking_patches is None) == (mask_ratio is None):
            raise ValueError("give exactly one of num_masking_patches and mask_ratio")
        if mask_ratio is not None:
            num_masking_patches = _count_from_ratio(mask_ratio, self.num_patches)
        self.num_masking_patches = _check_count(num_masking_patches, self.num_patches)
        self.seed = seed
        self._pid = os.getpid()
        self._rng = np.random.default_rng(seed)

    def reseed(self, seed: int | None) -> None:
        self.seed = seed
        self._pid = os.getpid()
        self._rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return (
            f"RandomMaskingGenerator({self.height}, {self.width}, "
            f"mask {self.num_masking_patches} of {self.num_patches})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __call__(self) -> np.ndarray:
        """Return an int8 [H, W] mask (1 = masked) with exactly ``num_masking_patches`` ones."""
        if self.seed is None and os.getpid() != self._pid:
            # Forked child: don't replay the parent's entropy-seeded stream.
            self.reseed(None)
        mask = np.zeros(self.num_patches, dtype=np.int8)
        mask[self._rng.choice(self.num_patches, self.num_masking_patches, replace=False)] = 1
        return mask.reshape(self.height, self.width)


def build_mask_generator(
    kind: str,
    input_size: int | tuple[int, int],
    num_masking_patches: int | None = None,
    mask_ratio: float | None = None,
    min_num_patches: int = 16,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    seed: int | None = None,
) -> BlockMaskingGenerator | RandomMaskingGenerator:
    """Build the mask generator named by ``kind`` ("block" or "random").

    Give exactly one of ``num_masking_patches`` and ``mask_ratio`` (count = int(ratio * H * W)).
    ``min_num_patches``, ``max_num_patches`` and ``min_aspect`` only apply to "block".
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask generator kind {kind!r}; allowed: {', '.join(MASK_KINDS)}")
    if (num_masking_patches is None) == (mask_ratio is None):
        raise ValueError("give exactly one of num_masking_patches and mask_ratio")
    if kind == "random":
        return RandomMaskingGenerator(
            input_size, num_masking_patches=num_masking_patches, mask_ratio=mask_ratio, seed=seed
        )
    if mask_ratio is not None:
        height, width = _as_grid(input_size)
        num_masking_patches = _count_from_ratio(mask_ratio, height * width)
    assert num_masking_patches is not None
    return BlockMaskingGenerator(
        input_size,
        num_masking_patches=num_masking_patches,
        min_num_patches=min_num_patches,
        max_num_patches=max_num_patches,
        min_aspect=min_aspect,
        seed=seed,
    )


def masks_to_bool(batch: Any) -> np.ndarray:
    """Flatten a batch of [H, W] masks (array [B, H, W] or a sequence of [H, W]) to bool [B, H*W].

    Row-major, as the official training loop's ``flatten(1).to(torch.bool)``: index = r * W + c.
    """
    arr = np.asarray(batch)
    if arr.ndim != 3:
        raise ValueError(f"expected masks of shape [B, H, W], got shape {arr.shape}")
    return arr.reshape(arr.shape[0], -1).astype(bool)
