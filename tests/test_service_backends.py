"""Backends, automatic selection, and the start-up checks that refuse a damaged bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.backends import BackendOptions, BackendUnavailable, select_backend
from service.backends.openvino import OpenVinoBackend, cpu_has_bf16
from service.backends.select import measure_cosine
from service.backends.torch_backend import TorchBackend
from service.bundle import BundleError, load_bundle
from service.runtime import StartupError
from tests.test_service_fixtures import TinyBundle, get_tiny_bundle, png_bytes, serve

RAW = {"content-type": "image/png", "accept": "application/x-npy"}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    return get_tiny_bundle(tmp_path_factory)


def _x(n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _ref(tiny: TinyBundle, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(tiny.path / "embed.onnx")).run(None, {"images": x})[0]


def test_openvino_fp32_matches_onnxruntime_and_bf16_is_close(tiny_bundle: TinyBundle) -> None:
    pytest.importorskip("openvino")
    bundle = load_bundle(tiny_bundle.path)
    ov = OpenVinoBackend()
    ov.load(bundle, "fp32")
    x = _x()
    np.testing.assert_allclose(ov.infer("embed", {"images": x}), _ref(tiny_bundle, x), atol=1e-4)
    mask = np.zeros((3, 16), dtype=bool)
    mask[:, [1, 4, 9]] = True
    assert ov.infer("reconstruct", {"images": x, "mask": mask}).shape == (3, 3, 192)
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 support (AMX / AVX-512-BF16)")
    ov16 = OpenVinoBackend()
    ov16.load(bundle, "bf16")
    assert measure_cosine(ov16, bundle) > 0.99


def test_auto_takes_the_fastest_candidate_meeting_the_bound(tiny_bundle: TinyBundle) -> None:
    pytest.importorskip("openvino")
    bundle = load_bundle(tiny_bundle.path)
    # cosine 1.0 is met only by exact fp32 graphs: bf16 and int8 are measured / recorded below it
    sel = select_backend(bundle, "auto", "auto", BackendOptions(device="cpu"), min_cosine=1.0)
    # the exact candidates left are timed here and the fastest kept (measured, not assumed)
    assert sel.backend.precision == "fp32" and set(sel.timings) == {"openvino fp32", "onnxruntime fp32"}
    assert f"{sel.backend.name} fp32" == max(sel.timings, key=sel.timings.get)
    assert any(s.startswith("onnxruntime int8: recorded cosine") for s in sel.skipped)
    if cpu_has_bf16():
        assert any(s.startswith("openvino bf16: measured cosine") for s in sel.skipped)
    assert any(s.startswith("tensorrt") for s in sel.skipped)
    loose = select_backend(bundle, "onnxruntime", "auto", BackendOptions(device="cpu"), min_cosine=0.99)
    # recorded int8 parity 0.9998 meets 0.99, so int8 and fp32 are both timed; the faster one is kept
    assert set(loose.timings) == {"onnxruntime int8", "onnxruntime fp32"}
    assert f"onnxruntime {loose.backend.precision}" == max(loose.timings, key=loose.timings.get)
    strict = select_backend(bundle, "onnxruntime", "auto", BackendOptions(device="cpu"), min_cosine=0.99999)
    assert strict.backend.precision == "fp32"
    explicit = select_backend(bundle, "onnxruntime", "int8", BackendOptions(device="cpu"), min_cosine=1.0)
    assert explicit.backend.precision == "int8" and explicit.backend.task_precision["embed"] == "int8"


def test_auto_app_reports_its_choice(tiny_bundle: TinyBundle) -> None:
    with serve(tiny_bundle.path, backend="auto", precision="auto", min_cosine=1.0) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert (
            card["backend"]["name"] in ("openvino", "onnxruntime") and card["backend"]["precision"] == "fp32"
        )
        assert "fastest available backend" in card["selection"]["reason"]
        r = c.post("/embed", content=png_bytes(), headers=RAW)
        assert r.status_code == 200


def test_torch_backend_runs_the_source_checkpoint(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    bundle = load_bundle(tiny_bundle.path)
    tb = TorchBackend()
    tb.load(bundle)
    x = _x()
    np.testing.assert_allclose(tb.infer("embed", {"images": x}), _ref(tiny_bundle, x), atol=1e-4)
    with serve(tiny_bundle.path, backend="torch") as c:
        assert c.get("/v1/models").json()["data"][0]["backend"]["name"] == "torch"
        assert (
            c.post("/reconstruct", content=png_bytes(), headers={"content-type": "image/png"}).status_code
            == 200
        )
    no_ckpt = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, no_ckpt)
    (no_ckpt / "model.safetensors").unlink()
    with pytest.raises(BackendUnavailable, match="model.safetensors"):
        TorchBackend().load(load_bundle(no_ckpt))
    (no_ckpt / "model.safetensors").write_bytes(b"not the checkpoint")
    with pytest.raises(BackendUnavailable, match="sha256"):
        TorchBackend().load(load_bundle(no_ckpt))


def test_unavailable_backends_say_why(tiny_bundle: TinyBundle) -> None:
    bundle = load_bundle(tiny_bundle.path)
    with pytest.raises(BackendUnavailable, match="tensorrt|GPU|engine"):
        select_backend(bundle, "tensorrt", "auto")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        select_backend(bundle, "tvm", "auto")
    with pytest.raises(StartupError, match="refusing to start"):
        with serve(tiny_bundle.path, backend="tensorrt"):
            pass


# ------------------------------------------------------------------------------------ bundle checks
def _copy(tiny: TinyBundle, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny.path, dst)
    return dst


def test_altered_file_refuses_to_start(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    b = _copy(tiny_bundle, tmp_path)
    data = bytearray((b / "embed.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "embed.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"embed.onnx: sha256 mismatch .* altered or corrupted"):
        load_bundle(b)
    with pytest.raises(StartupError, match="refusing to start: .*embed.onnx: sha256 mismatch"):
        with serve(b):
            pass


def test_missing_unlisted_or_malformed_bundle_refuses_to_start(
    tiny_bundle: TinyBundle, tmp_path: Path
) -> None:
    b = _copy(tiny_bundle, tmp_path)
    (b / "reconstruct.onnx").unlink()
    with pytest.raises(BundleError, match="reconstruct.onnx: missing"):
        load_bundle(b)
    b2 = _copy(tiny_bundle, tmp_path / "2")
    spec = json.loads((b2 / "spec.json").read_text())
    del spec["files"]["embed.int8.onnx"]
    (b2 / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match="without a sha256"):
        load_bundle(b2)
    spec["files"]["embed.int8.onnx"] = "nothex"
    (b2 / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match="schema at files/embed.int8.onnx"):
        load_bundle(b2)
    (b2 / "spec.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        load_bundle(b2)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.settings import DEFAULT_MODEL_DIR, Settings

    assert Settings().model_dir == DEFAULT_MODEL_DIR
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nfile-key\n")
    monkeypatch.setenv("CAE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CAE_API_KEYS", "a, b")
    monkeypatch.setenv("CAE_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("CAE_BACKEND", "openvino")
    s = Settings()
    assert s.max_batch_size == 7 and s.backend == "openvino"
    assert [k.get_secret_value() for k in s.api_keys] == ["a", "b", "file-key"]
    shown = json.dumps(s.public_dict())
    assert "file-key" not in shown and '"3 configured"' in shown and "file-key" not in repr(s)
    assert Settings(max_batch_size=3).max_batch_size == 3  # explicit values (CLI flags) beat the environment
    with pytest.raises(ValueError):
        Settings(max_wait_ms=-1)
