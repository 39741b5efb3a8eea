"""Fixtures shared by the test modules (the functions behind them are in ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import OFFICIAL_A, TinyBundle, build_dense_bundle, get_tiny_bundle, make_image_folder


@pytest.fixture(scope="session")
def official_fixture_dir() -> Path:
    if not (OFFICIAL_A / "official_pretrain_ckpt.pth").exists():
        pytest.fail(
            f"official fixture missing under {OFFICIAL_A} "
            "(it ships in tests/fixtures; CAE_FIXTURES_DIR overrides)"
        )
    return OFFICIAL_A


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    """The service tests' tiny bundle (pixel + DALL-E target), exported once per session."""
    pytest.importorskip("onnxruntime")
    return get_tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="session")
def dense_bundle(tiny_bundle: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle plus hand-made segment and detect heads."""
    pytest.importorskip("onnx")
    return build_dense_bundle(tiny_bundle, tmp_path_factory.mktemp("dense") / "bundle")
