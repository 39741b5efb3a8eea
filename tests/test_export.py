"""ONNX export: bundles, parity with PyTorch and with the official fixture, spec schema, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import REPO, perturbed, tiny_overrides
from training.models import CAEConfig, save_model

ort = pytest.importorskip("onnxruntime")
from export.onnx_export import ExportError, export_bundle, validate_spec  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    model = perturbed(CAEConfig(**tiny_overrides(target="pixel")))
    ckpt = save_model(model, root / "tiny.safetensors")
    spec = export_bundle(ckpt, root / "out", fp16=True, int8=True)
    return model, root / "out", spec


def test_fixture_bundle_reproduces_official_outputs(official_fixture_dir, tmp_path):
    spec = export_bundle(official_fixture_dir / "official_pretrain_ckpt.pth", tmp_path / "b")
    inputs = np.load(official_fixture_dir / "inputs.npz")
    ref = np.load(official_fixture_dir / "outputs.npz")
    embed = ort.InferenceSession(str(tmp_path / "b" / "embed.onnx"))
    tokens, blocks = embed.run(None, {"images": inputs["images"]})
    np.testing.assert_allclose(tokens, ref["encoder_all_tokens"], rtol=0, atol=1e-4)
    rec = ort.InferenceSession(str(tmp_path / "b" / "reconstruct.onnx"))
    (logits,) = rec.run(None, {"images": inputs["images"], "mask": inputs["bool_masked_pos"]})
    np.testing.assert_allclose(logits, ref["decoder_logits_bmk"], rtol=0, atol=1e-4)
    assert spec["target"]["type"] == "dalle" and spec["target"]["pred_dim"] == 8192
    assert spec["image"]["mean"] == [0.485, 0.456, 0.406] and spec["image"]["grid"] == [8, 8]


def test_tiny_bundle_layout_and_checksums(tiny_bundle):
    _, out, spec = tiny_bundle
    on_disk = json.loads((out / "spec.json").read_text())
    assert on_disk == spec
    validate_spec(on_disk)
    graphs = {f"{t}{v}.onnx" for t in ("embed", "reconstruct") for v in ("", ".fp16", ".int8")}
    assert set(spec["files"]) == graphs | {"weights.bin"}  # the graphs' shared external data
    assert set(spec["external_data"]["weights.bin"]["graphs"]) == graphs
    import hashlib

    for name, digest in spec["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    e = spec["tasks"]["embed"]
    assert e["inputs"][0] == {"name": "images", "dtype": "float32", "shape": ["batch", 3, 32, 32]}
    assert e["outputs"][0]["shape"] == ["batch", 17, 64] and e["outputs"][1]["shape"] == ["batch", 2, 2, 64]
    assert e["default_pooling"] == "cls" and e["poolings"] == [
        "cls",
        "mean",
        "cls+mean",
        "last1",
        "last2",
        "none",
    ]
    assert e["parity"]["max_abs_diff"] <= 1e-4 and e["parity"]["min_cosine"] >= 0.99999
    assert e["variants"]["fp16"]["parity"]["min_cosine_pooled"] >= 0.999
    assert e["variants"]["int8"]["parity"]["min_cosine_pooled"] >= 0.99


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_and_mask_count(tiny_bundle, batch):
    model, out, _ = tiny_bundle
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    tokens, blocks = ort.InferenceSession(str(out / "embed.onnx")).run(None, {"images": x})
    with torch.no_grad():
        ref = model.forward_features(torch.from_numpy(x)).numpy()
    assert tokens.shape == (batch, 17, 64) and blocks.shape == (batch, 2, 2, 64)
    np.testing.assert_allclose(tokens, ref, atol=1e-4)
    with torch.no_grad():  # every readout is a slice of the outputs
        np.testing.assert_allclose(
            blocks, model.forward_block_readouts(torch.from_numpy(x)).numpy(), atol=1e-4
        )
        np.testing.assert_allclose(blocks[:, -1, 0], ref[:, 0], atol=1e-4)
        last2 = model.forward_readout(torch.from_numpy(x), "last2").numpy()
    np.testing.assert_allclose(blocks.reshape(batch, -1), last2, atol=1e-4)
    for nm in (3, 11):
        mask = np.zeros((batch, 16), dtype=bool)
        mask[:, np.random.default_rng(nm).choice(16, nm, replace=False)] = True
        (pred,) = ort.InferenceSession(str(out / "reconstruct.onnx")).run(None, {"images": x, "mask": mask})
        with torch.no_grad():
            ref = model(torch.from_numpy(x), torch.from_numpy(mask)).pred.numpy()
        assert pred.shape == (batch, nm, 8 * 8 * 3)
        np.testing.assert_allclose(pred, ref, atol=1e-4)


def test_export_at_another_image_size(tmp_path):
    model = perturbed(CAEConfig(**tiny_overrides()))
    ckpt = save_model(model, tmp_path / "m.safetensors")
    spec = export_bundle(ckpt, tmp_path / "b", tasks=("embed",), image_size=48)
    assert spec["image"]["grid"] == [6, 6] and spec["tasks"]["embed"]["outputs"][0]["shape"] == [
        "batch",
        37,
        64,
    ]
    with pytest.raises(ExportError, match="multiple of the patch size"):
        export_bundle(ckpt, tmp_path / "c", tasks=("embed",), image_size=50)


def test_schema_rejects_broken_spec(tiny_bundle):
    spec = json.loads(json.dumps(tiny_bundle[2]))
    spec["files"]["embed.onnx"] = "not-a-hash"
    with pytest.raises(ExportError, match="spec.json"):
        validate_spec(spec)


def test_cli_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "export", "onnx", str(tmp_path / "missing.pth"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 2 and "no such file" in r.stderr


def test_triton_repository(tiny_bundle, tmp_path):
    from export.triton import export_triton, validate_config

    _, out, spec = tiny_bundle
    dirs = export_triton(out, tmp_path / "repo", max_batch_size=16, instance_kind="KIND_CPU")
    assert sorted(d.name for d in dirs) == ["cae_embed", "cae_reconstruct"]
    embed = (tmp_path / "repo" / "cae_embed" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in embed and "max_batch_size: 16" in embed
    assert "dims: [ 3, 32, 32 ]" in embed and "dims: [ 17, 64 ]" in embed and "dynamic_batching" in embed
    rec = (tmp_path / "repo" / "cae_reconstruct" / "config.pbtxt").read_text()
    assert "TYPE_BOOL" in rec and "dims: [ -1, 192 ]" in rec and "dynamic_batching" not in rec
    assert (tmp_path / "repo" / "cae_embed" / "1" / "model.onnx").read_bytes() == (
        out / "embed.onnx"
    ).read_bytes()
    pytest.importorskip("tritonclient.grpc")
    from export.triton import TritonError

    validate_config(embed)
    with pytest.raises(TritonError, match="ModelConfig"):
        validate_config(embed.replace("max_batch_size", "max_batch"))
    with pytest.raises(TritonError, match="dims"):
        validate_config(embed.replace("dims: [ 17, 64 ]", "dims: [ 0, 64 ]"))


def test_tensorrt_needs_gpu(tiny_bundle):
    """Runs the real build + parity where TensorRT and a GPU exist; elsewhere checks the clear error."""
    from export.tensorrt import TensorRTError, export_tensorrt

    _, out, _ = tiny_bundle
    if not torch.cuda.is_available():
        with pytest.raises(TensorRTError, match="TensorRT|GPU"):
            export_tensorrt(out)
        pytest.skip("no CUDA GPU here: TensorRT engines were not built")
    pytest.importorskip("tensorrt")
    spec = export_tensorrt(out, fp16=True, min_batch=1, opt_batch=4, max_batch=8)
    for task in ("embed", "reconstruct"):
        eng = spec["tasks"][task]["tensorrt"][-1]
        assert eng["parity"]["min_cosine_vs_onnxruntime"] >= 0.999 and (out / eng["file"]).exists()


def test_default_bundle_is_consistent_and_reexports(tmp_path):
    """The committed default bundle: checksums match, graphs equal its checkpoint, and it re-exports."""
    import hashlib

    from training.models import load_model

    bundle = REPO / "models" / "default"
    spec = json.loads((bundle / "spec.json").read_text())
    validate_spec(spec)
    for name, digest in spec["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest, name
    ckpt = bundle / "model.safetensors"
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == spec["model"]["source_sha256"]
    model = load_model(ckpt)
    x = np.random.default_rng(0).standard_normal((3, 3, 28, 28)).astype(np.float32)
    tokens = ort.InferenceSession(str(bundle / "embed.onnx")).run(["tokens"], {"images": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(tokens, model.forward_features(torch.from_numpy(x)).numpy(), atol=1e-4)
    fresh = export_bundle(ckpt, tmp_path / "re", tasks=("embed",))
    assert fresh["tasks"]["embed"]["parity"]["max_abs_diff"] <= 1e-4
    assert spec["class_names"] and len(spec["class_names"]) == 10


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_default_bundle_dense_graphs_match_their_heads(task):
    """segment.onnx / detect.onnx in the default bundle equal the committed head checkpoints they came
    from."""
    import hashlib

    from export.dense_export import DetectGraph
    from training.dense.train import load_dense_model

    bundle = REPO / "models" / "default"
    spec = json.loads((bundle / "spec.json").read_text())
    entry = spec["tasks"].get(task)
    if entry is None:
        pytest.skip(f"the default bundle has no {task} task")
    head = bundle / f"{task}.safetensors"
    assert hashlib.sha256(head.read_bytes()).hexdigest() == entry["source_sha256"]
    model, cfg, pre, classes = load_dense_model(head)
    assert classes == entry["classes"] and entry["image"]["size"] == cfg.model.img_size
    s = cfg.model.img_size
    sess = ort.InferenceSession(str(bundle / entry["file"]))
    x = np.random.default_rng(1).standard_normal((1, 3, s, s)).astype(np.float32)
    outs = sess.run(None, {"images": x})
    with torch.no_grad():
        ref = [model(torch.from_numpy(x)).numpy()] if task == "segment" else [
            t.numpy() for t in DetectGraph(model)(torch.from_numpy(x))]  # fmt: skip
    assert len(outs) == len(ref)
    for a, b in zip(outs, ref, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_a_variant_that_misses_its_bound_is_left_out_not_fatal(tmp_path, monkeypatch):
    """An int8 graph below its cosine bound is dropped from its task with the reason in spec.json; the
    fp32 graphs and the other variants ship, and the bundle still loads in the service."""
    import export.onnx_export as X
    from service.bundle import load_bundle

    monkeypatch.setattr(X, "INT8_MIN_COS", 1.5)  # no int8 graph can reach it
    model = perturbed(CAEConfig(**tiny_overrides(target="pixel")))
    ckpt = save_model(model, tmp_path / "tiny.safetensors")
    spec = export_bundle(ckpt, tmp_path / "out", fp16=True, int8=True)
    for task in ("embed", "reconstruct"):
        e = spec["tasks"][task]
        assert set(e["variants"]) == {"fp16"} and "misses its bound" in e["variants_left_out"]["int8"]
        assert not (tmp_path / "out" / f"{task}.int8.onnx").exists()
    validate_spec(json.loads((tmp_path / "out" / "spec.json").read_text()))
    assert load_bundle(tmp_path / "out").spec["tasks"]["embed"]["file"] == "embed.onnx"
