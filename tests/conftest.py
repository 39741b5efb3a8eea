from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The shared reference material sits beside the checkout; CAE_FIXTURES_DIR points elsewhere if needed.
FIXTURES = Path(os.environ.get("CAE_FIXTURES_DIR", REPO.parent / "shared" / "fixtures"))
OFFICIAL_A = FIXTURES / "official-cae-a"


@pytest.fixture(scope="session")
def official_fixture_dir() -> Path:
    if not (OFFICIAL_A / "official_pretrain_ckpt.pth").exists():
        pytest.skip(f"official fixture not found under {OFFICIAL_A} (set CAE_FIXTURES_DIR)")
    return OFFICIAL_A


def tiny_overrides(**kw):
    """A CAE small enough for fast CPU tests: 32x32 images, 16 patches of 8 px, 2 blocks."""
    base = dict(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=64,
        regressor_depth=2,
        decoder_depth=1,
        decoder_num_heads=4,
        vocab_size=128,
        drop_path_rate=0.0,
    )
    base.update(kw)
    return base
