from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A copy of the official fixture ships with the tests (so CI always checks it); CAE_FIXTURES_DIR overrides.
FIXTURES = Path(os.environ.get("CAE_FIXTURES_DIR", REPO / "tests" / "fixtures"))
OFFICIAL_A = FIXTURES / "official-cae-a"


@pytest.fixture(scope="session")
def official_fixture_dir() -> Path:
    if not (OFFICIAL_A / "official_pretrain_ckpt.pth").exists():
        pytest.fail(f"official fixture missing under {OFFICIAL_A} (it ships in tests/fixtures; CAE_FIXTURES_DIR overrides)")
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


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 16, size: int = 20, seed: int = 0) -> Path:
    """A small separable ImageFolder: class c = stripes at orientation c, random colours and phase."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(n_classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        angle = np.pi * c / n_classes
        for i in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 1.2 + phase) > 0
            fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            img = np.where(wave[..., None], fg, bg).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")
