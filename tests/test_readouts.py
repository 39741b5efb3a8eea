"""What /embed serves by default is what evaluation measures: the same readout, through the exported graph."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO, serve, tiny_overrides
from training import data as D
from training import evaluation as E
from training.models import CAEConfig, save_model

FMNIST = D.FMNIST_DIR / "t10k-images-idx3-ubyte.gz"


def _real_images(n: int, size: int) -> list[Image.Image]:
    """Fashion-MNIST test garments when the package is installed, else seeded structured images."""
    if FMNIST.exists() or (D.FMNIST_DIR / "t10k-images-idx3-ubyte").exists():
        src = D.FashionMNIST(split="test")
        return [src[i * 97][0] for i in range(n)]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        a = np.zeros((size, size), np.uint8)
        y0, x0 = rng.integers(0, size // 2, 2)
        a[y0 : y0 + size // 2, x0 : x0 + size // 3] = rng.integers(120, 255)
        out.append(Image.fromarray(a, "L").convert("RGB"))
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _served_vs_measured(
    bundle: Path, ckpt: Path, images: list[Image.Image], pooling: str | None
) -> np.ndarray:
    backbone = E.resolve_backbone(str(ckpt))
    feature = pooling or backbone.readout or "cls"
    pre = backbone.preprocess
    tf = D.EvalTransform(backbone.cfg.img_size, pre["mean"], pre["std"])
    x = torch.stack([tf(im) for im in images])
    ds = torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    measured = E.extract_features(backbone.model(), ds, readouts=[feature])[feature]
    with serve(bundle) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert feature in card["poolings"]
        url = "/embed" if pooling is None else f"/embed?pooling={pooling}"
        files = [("files", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(images)]
        served = []
        for s in range(0, len(files), 3):  # the test limits allow a few images per request
            r = client.post(url, files=files[s : s + 3], headers={"accept": "application/x-npy"})
            assert r.status_code == 200, r.text
            served.append(np.load(io.BytesIO(r.content)))
    got = np.concatenate(served)
    assert got.shape == measured.shape
    return _cosines(got, measured)


@pytest.fixture(scope="module")
def readout_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from export.onnx_export import export_bundle

    root = tmp_path_factory.mktemp("readout")
    torch.manual_seed(0)
    from training.models import CAE

    model = CAE(CAEConfig(**tiny_overrides(target="pixel", img_size=28, patch_size=4)))
    pre = {"img_size": 28, "mean": list(D.FMNIST_MEAN), "std": list(D.FMNIST_STD), "interpolation": "bicubic"}
    ckpt = save_model(
        model, root / "m.safetensors", metadata={"readout": "last2", "preprocess": json.dumps(pre)}
    )
    spec = export_bundle(ckpt, root / "bundle", tasks=("embed",))
    assert spec["tasks"]["embed"]["default_pooling"] == "last2"
    return root / "bundle", ckpt


@pytest.mark.parametrize("pooling", [None, "cls", "mean", "cls+mean", "last1"])
def test_embed_pooling_is_the_evaluated_readout(
    readout_bundle: tuple[Path, Path], pooling: str | None
) -> None:
    bundle, ckpt = readout_bundle
    cos = _served_vs_measured(bundle, ckpt, _real_images(6, 28), pooling)
    assert cos.min() >= 0.999, cos


def test_unoffered_pooling_is_422(readout_bundle: tuple[Path, Path]) -> None:
    bundle, _ = readout_bundle
    with serve(bundle) as client:
        r = client.post(
            "/embed?pooling=last3",
            content=_png(_real_images(1, 28)[0]),
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 422 and "last2" in r.json()["error"]["message"]
        js = client.post(
            "/embed", content=_png(_real_images(1, 28)[0]), headers={"content-type": "image/png"}
        ).json()
        assert js["pooling"] == "last2" and js["dim"] == 2 * 2 * 64


def test_default_bundle_serves_what_its_card_measured() -> None:
    """The committed default bundle: /embed without ?pooling= equals eval's default feature of its
    checkpoint on real test images (the model card's headline numbers use that feature)."""
    bundle = REPO / "models" / "default"
    spec = json.loads((bundle / "spec.json").read_text())
    if "default_pooling" not in spec["tasks"]["embed"]:
        pytest.skip("the default bundle predates named readouts")
    cos = _served_vs_measured(bundle, bundle / "model.safetensors", _real_images(9, 28), None)
    assert cos.min() >= 0.999, cos


def test_convert_sets_the_readout_and_keeps_our_metadata(tmp_path: Path) -> None:
    from training.models import CAE, CheckpointError, convert_checkpoint
    from training.models.checkpoint import read_metadata

    pre = {"img_size": 32, "mean": [0.1] * 3, "std": [0.2] * 3, "interpolation": "bicubic"}
    src = save_model(
        CAE(CAEConfig(**tiny_overrides())),
        tmp_path / "a.safetensors",
        metadata={"preprocess": json.dumps(pre)},
    )
    convert_checkpoint(src, tmp_path / "b.safetensors", readout="last2")
    meta = read_metadata(tmp_path / "b.safetensors")
    assert meta["readout"] == "last2" and json.loads(meta["preprocess"]) == pre
    assert E.resolve_backbone(str(tmp_path / "b.safetensors")).readout == "last2"
    with pytest.raises(CheckpointError, match="lastN"):
        convert_checkpoint(src, tmp_path / "c.safetensors", readout="last3")  # the tiny model has 2 blocks


def test_feature_cache_ignores_metadata_but_not_weights(tmp_path: Path) -> None:
    from training.models import CAE, convert_checkpoint

    torch.manual_seed(0)
    src = save_model(CAE(CAEConfig(**tiny_overrides())), tmp_path / "a.safetensors")
    convert_checkpoint(src, tmp_path / "b.safetensors", readout="mean")
    a, b = (E.resolve_backbone(str(tmp_path / n)) for n in ("a.safetensors", "b.safetensors"))
    assert a.identity == b.identity  # same weights, other metadata: the cached features are valid
    torch.manual_seed(1)
    c = save_model(CAE(CAEConfig(**tiny_overrides())), tmp_path / "c.safetensors")
    assert E.resolve_backbone(str(c)).identity != a.identity
