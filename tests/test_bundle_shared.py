"""Shared weights: a bundle's graphs keep their initializers in one ONNX external-data file (weights.bin),
each distinct tensor stored once; it serves exactly what the self-contained bundle serves, and a missing
or damaged weights.bin is refused at start-up with the file named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.bundle import BundleError, load_bundle
from service.bundle_format import WEIGHTS_FILE
from tests.helpers import perturbed, tiny_overrides

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from export.onnx_export import export_bundle  # noqa: E402
from training.models import CAEConfig, save_model  # noqa: E402

GRAPHS = ("embed.onnx", "embed.int8.onnx", "reconstruct.onnx", "reconstruct.int8.onnx")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """The same tiny checkpoint exported self-contained and with shared weights (int8 variants too)."""
    root = tmp_path_factory.mktemp("shared")
    ckpt = save_model(perturbed(CAEConfig(**tiny_overrides(target="pixel"))), root / "tiny.safetensors")
    export_bundle(ckpt, root / "own", int8=True, shared_weights=False)
    spec = export_bundle(ckpt, root / "shared", int8=True)
    return root / "own", root / "shared", spec


def _feeds(spec: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    img = spec["image"]
    x = rng.standard_normal((3, img["channels"], img["size"], img["size"])).astype(np.float32)
    mask = np.zeros((3, img["num_patches"]), dtype=bool)
    for row in mask:
        row[rng.choice(img["num_patches"], img["num_patches"] // 2, replace=False)] = True
    return {"embed": {"images": x}, "reconstruct": {"images": x, "mask": mask}}


def _initializer_bytes(path: Path) -> int:
    model = onnx.load(str(path))
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _spans(path: Path) -> set[tuple[str, str]]:
    """(offset, length) of each external initializer of ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    out = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            d = {e.key: e.value for e in t.external_data}
            out.add((d["offset"], d["length"]))
    return out


def test_layout_spec_and_each_tensor_stored_once(bundles: tuple[Path, Path, dict[str, Any]]) -> None:
    own, shared, spec = bundles
    assert not (own / WEIGHTS_FILE).exists()
    assert "external_data" not in json.loads((own / "spec.json").read_text())
    entry = spec["external_data"][WEIGHTS_FILE]
    assert sorted(entry["graphs"]) == sorted(GRAPHS)
    assert set(spec["files"]) == {*GRAPHS, WEIGHTS_FILE}
    assert entry["bytes"] == (shared / WEIGHTS_FILE).stat().st_size
    assert entry["tensors"] < entry["references"]  # shared tensors are referenced more than once
    for name in GRAPHS:
        onnx.checker.check_model(str(shared / name))  # by path: external locations resolve inside the bundle
        m = onnx.load(str(shared / name), load_external_data=False)
        ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        locations = {d.value for t in ext for d in t.external_data if d.key == "location"}
        assert ext and locations == {WEIGHTS_FILE}
        own_m = onnx.load(str(own / name), load_external_data=False)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in own_m.graph.initializer)
    # stored once: weights.bin holds less than the graphs' weights summed (the encoder is in embed and
    # reconstruct), and the shared bundle is smaller on disk than the self-contained one
    assert entry["bytes"] < sum(_initializer_bytes(own / n) for n in GRAPHS)
    for variant in ("", ".int8"):  # embed's encoder points at the very bytes reconstruct's encoder uses
        spans = {n: _spans(shared / f"{n}{variant}.onnx") for n in ("embed", "reconstruct")}
        assert len(spans["embed"] & spans["reconstruct"]) >= 0.9 * len(spans["embed"])
    size = sum((shared / n).stat().st_size for n in spec["files"])
    assert size < sum((own / n).stat().st_size for n in GRAPHS)  # tiny graphs: mostly structure
    # parity reports are those of the self-contained graphs (the weights move bit for bit)
    own_spec = json.loads((own / "spec.json").read_text())
    for task in ("embed", "reconstruct"):
        assert spec["tasks"][task]["parity"] == own_spec["tasks"][task]["parity"]
        assert spec["tasks"][task]["variants"] == own_spec["tasks"][task]["variants"]


def test_shared_graphs_give_identical_outputs(bundles: tuple[Path, Path, dict[str, Any]]) -> None:
    own, shared, spec = bundles
    feeds = _feeds(spec)
    for name in GRAPHS:
        feed = feeds[name.split(".")[0]]
        a = ort.InferenceSession(str(own / name), providers=["CPUExecutionProvider"]).run(None, feed)
        b = ort.InferenceSession(str(shared / name), providers=["CPUExecutionProvider"]).run(None, feed)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backends_serve_identical_outputs(bundles: tuple[Path, Path, dict[str, Any]], backend: str) -> None:
    from service.backends.onnxruntime import OnnxRuntimeBackend
    from service.backends.openvino import OpenVinoBackend

    if backend == "openvino":
        pytest.importorskip("openvino")
    cls = {"onnxruntime": OnnxRuntimeBackend, "openvino": OpenVinoBackend}[backend]
    own, shared, spec = bundles
    feeds = _feeds(spec)
    precisions = ("fp32", "int8") if backend == "onnxruntime" else ("fp32",)
    for precision in precisions:
        outs = []
        for path in (own, shared):
            b = cls()
            b.load(load_bundle(path), precision)
            outs.append({t: b.infer_outputs(t, feeds[t]) for t in ("embed", "reconstruct")})
            b.close()
        for task in ("embed", "reconstruct"):
            for k, v in outs[0][task].items():
                np.testing.assert_array_equal(v, outs[1][task][k], err_msg=f"{backend} {precision} {task}")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_or_damaged_shared_file_is_refused(bundles: tuple[Path, Path, dict[str, Any]],
                                                   tmp_path: Path) -> None:  # fmt: skip
    _, shared, _ = bundles
    b = _copy(shared, tmp_path / "missing")
    (b / WEIGHTS_FILE).unlink()
    for verify in (True, False):  # even without the sha256 pass: a size/presence check is free
        with pytest.raises(BundleError, match=rf"{WEIGHTS_FILE}: missing \(the shared weights of embed"):
            load_bundle(b, verify=verify)
    b = _copy(shared, tmp_path / "flipped")
    data = bytearray((b / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{WEIGHTS_FILE}: sha256 mismatch .* shared weights .* corrupted"):
        load_bundle(b)
    b = _copy(shared, tmp_path / "truncated")
    with open(b / WEIGHTS_FILE, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(BundleError, match=rf"{WEIGHTS_FILE}: 1000 bytes, spec.json records"):
        load_bundle(b, verify=False)
    b = _copy(shared, tmp_path / "unlisted")
    spec = json.loads((b / "spec.json").read_text())
    del spec["files"][WEIGHTS_FILE]
    (b / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match=rf"references \['{WEIGHTS_FILE}'\] without a sha256"):
        load_bundle(b)


def test_resharing_is_idempotent(bundles: tuple[Path, Path, dict[str, Any]], tmp_path: Path) -> None:
    from export.onnx_common import share_weights

    _, shared, spec = bundles
    b = _copy(shared, tmp_path / "again")
    entry = share_weights(sorted(b / n for n in GRAPHS))  # the exporter's order
    assert entry == spec["external_data"][WEIGHTS_FILE]
    assert (b / WEIGHTS_FILE).read_bytes() == (shared / WEIGHTS_FILE).read_bytes()


def test_cli_flag_turns_sharing_off() -> None:
    from export.__main__ import build_parser

    base = ["onnx", "ckpt.safetensors", "out"]
    assert build_parser().parse_args(base).shared_weights is True
    assert build_parser().parse_args([*base, "--no-shared-weights"]).shared_weights is False


def test_triton_models_carry_the_shared_weights(bundles: tuple[Path, Path, dict[str, Any]],
                                                tmp_path: Path) -> None:  # fmt: skip
    pytest.importorskip("tritonclient")
    from export.triton import export_triton

    _, shared, spec = bundles
    export_triton(shared, tmp_path / "repo", instance_kind="KIND_CPU")
    model = tmp_path / "repo" / "cae_embed" / "1"
    assert (model / WEIGHTS_FILE).read_bytes() == (shared / WEIGHTS_FILE).read_bytes()
    x = _feeds(spec)["embed"]
    out = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, x)
    ref = ort.InferenceSession(str(shared / "embed.onnx"), providers=["CPUExecutionProvider"]).run(None, x)
    np.testing.assert_array_equal(out[0], ref[0])
