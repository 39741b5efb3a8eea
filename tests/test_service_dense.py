"""POST /segment and /detect through the real app, on the tiny bundle's embed graph plus hand-made dense
heads (``onnx.helper``) that follow the export contract: segment = a 1x1 Conv from RGB to class logits,
detect = constant detections kept or dropped (N = 0) by the input's mean brightness."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.bundle import BundleError, load_bundle
from service.dense import label_map, rle_encode
from service.imaging import Limits, Preprocessor
from tests.helpers import (
    CASE_LIMITS,
    DET_CLASSES,
    RAW,
    SEG_CLASSES,
    S,
    TinyBundle,
    det_masks,
    encode,
    error_cases,
    run_torchless_driver,
    serve,
)

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def client(dense_bundle: Path):
    with serve(dense_bundle, **CASE_LIMITS) as c:
        yield c


# ------------------------------------------------------------------------------------------ helpers
def png(arr: np.ndarray) -> bytes:
    return encode(Image.fromarray(arr))


def stripes(w: int = 100, h: int = 60) -> np.ndarray:
    """Grey top band (background), red left half, green right half."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (230, 20, 20)
    img[:, w // 2 :] = (20, 230, 20)
    img[: h // 3] = (128, 128, 128)
    return img


def bright(w: int = 96, h: int = 144) -> bytes:
    return png(np.full((h, w, 3), 220, np.uint8))


def dark(w: int = 96, h: int = 144) -> bytes:
    return png(np.zeros((h, w, 3), np.uint8))


def unpng(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO uncompressed RLE -> bool [H, W] (column-major runs, starting with zeros)."""
    h, w = rle["size"]
    flat = np.zeros(h * w, bool)
    pos, value = 0, False
    for n in rle["counts"]:
        flat[pos : pos + n] = value
        pos, value = pos + n, not value
    assert pos == h * w
    return flat.reshape((h, w), order="F")


def reference_labels(bundle_dir: Path, img: np.ndarray) -> np.ndarray:
    """Independent reference: ORT logits, each class resized with PIL bilinear (upscaling), argmax."""
    import onnxruntime as ort

    bundle = load_bundle(bundle_dir)
    x = Preprocessor(bundle.image_for("segment"), Limits(10**8, 1))(png(img))[None]
    (logits,) = ort.InferenceSession(str(bundle_dir / "segment.onnx")).run(None, {"images": x})
    h, w = img.shape[:2]
    up = [
        np.asarray(Image.fromarray(c, mode="F").resize((w, h), Image.Resampling.BILINEAR)) for c in logits[0]
    ]
    return np.stack(up).argmax(0)


# -------------------------------------------------------------------------------------------- segment
def test_segment_label_map_at_original_size(client, dense_bundle: Path) -> None:
    img = stripes()
    r = client.post("/segment", content=png(img), headers=RAW)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == SEG_CLASSES and body["input_size"] == [S, S] and body["format"] == "png"
    assert body["model"] == r.headers["x-model-id"] and set(body["timing_ms"]) >= {"inference_ms", "total_ms"}
    (res,) = body["results"]
    assert (res["width"], res["height"]) == (100, 60) and res["labels"] is None and res["overlay"] is None
    labels = unpng(res["label_map"])
    assert labels.shape == (60, 100) and labels.dtype == np.uint8
    # bilinear logits then argmax: equal to the PIL reference (ties at exact class boundaries aside)
    ref = reference_labels(dense_bundle, img)
    assert (labels == ref).mean() > 0.995
    assert (labels[:18] == 0).all() and (labels[22:, :45] == 1).all() and (labels[22:, 55:] == 2).all()
    counts = {c["name"]: c["pixels"] for c in res["class_pixels"]}
    assert sum(counts.values()) == 6000 and [c["id"] for c in res["class_pixels"]] == [0, 1, 2]
    assert counts == {n: int((labels == i).sum()) for i, n in enumerate(SEG_CLASSES)}
    assert sum(c["fraction"] for c in res["class_pixels"]) == pytest.approx(1.0)
    # format=json: the same ids as nested lists
    js = client.post("/segment?format=json", content=png(img), headers=RAW).json()["results"][0]
    assert js["label_map"] is None and np.array_equal(np.asarray(js["labels"]), labels)


def test_segment_overlay_raw_png_and_several_images(client) -> None:
    img = stripes(64, 80)
    r = client.post("/segment?overlay=true&overlay_alpha=1", content=png(img), headers=RAW).json()
    res = r["results"][0]
    over = unpng(res["overlay"])
    labels = unpng(res["label_map"])
    palette = np.asarray(r["palette"], np.uint8)
    assert over.shape == (80, 64, 3) and palette.shape == (3, 3)
    assert np.array_equal(over[labels == 1], np.broadcast_to(palette[1], over[labels == 1].shape))
    assert np.array_equal(over[labels == 0], img[labels == 0])  # background keeps the image
    # Accept: image/png with one image: the label map itself
    raw = client.post("/segment", content=png(img), headers={**RAW, "accept": "image/png"})
    assert raw.headers["content-type"] == "image/png" and raw.headers["x-image-size"] == "64,80"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw.content))), labels)
    # several images (multipart and JSON) answer in order, each at its own size
    a, b = png(stripes(40, 30)), png(stripes(90, 50))
    multi = client.post(
        "/segment", files=[("files", ("a.png", a, "image/png")), ("files", ("b.png", b, "image/png"))]
    )
    as_json = client.post("/segment", json={"images": [base64.b64encode(x).decode() for x in (a, b)]})
    for resp in (multi, as_json):
        assert resp.status_code == 200, resp.text
        sizes = [unpng(x["label_map"]).shape for x in resp.json()["results"]]
        assert sizes == [(30, 40), (50, 90)]
    refused = client.post(
        "/segment", files=[("files", ("a.png", a, "image/png")), ("files", ("b.png", b, "image/png"))],
        headers={"accept": "image/png"},
    )  # fmt: skip
    assert refused.status_code == 406 and refused.json()["error"]["code"] == "not_acceptable"


# --------------------------------------------------------------------------------------------- detect
def test_detect_boxes_in_original_pixels_and_filters(client) -> None:
    r = client.post("/detect", content=bright(96, 144), headers=RAW)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["score_threshold"] == 0.5 and body["max_detections"] == 100 and body["masks"] == "none"
    assert body["classes"] == DET_CLASSES and body["input_size"] == [S, S]
    (res,) = body["results"]
    assert (res["width"], res["height"]) == (96, 144)
    dets = res["detections"]
    assert [d["score"] for d in dets] == pytest.approx([0.9, 0.6])  # default threshold 0.5
    assert [(d["label"], d["label_name"]) for d in dets] == [(1, "thing"), (2, "stuff")]
    # x scaled by 96/48 = 2, y by 144/48 = 3, exactly
    assert dets[0]["box"] == [8.0, 24.0, 40.0, 120.0] and dets[1]["box"] == [48.0, 0.0, 96.0, 72.0]
    assert all(d["mask"] is None for d in dets)
    low = client.post("/detect?score_threshold=0.2", content=bright(), headers=RAW).json()
    assert [d["score"] for d in low["results"][0]["detections"]] == pytest.approx([0.9, 0.6, 0.3])
    top = client.post("/detect?score_threshold=0&max_detections=1", content=bright(), headers=RAW).json()
    assert [d["label"] for d in top["results"][0]["detections"]] == [1]
    high = client.post("/detect?score_threshold=0.95", content=bright(), headers=RAW).json()
    assert high["results"][0]["detections"] == []
    # N = 0 from the graph (a dark image)
    none = client.post("/detect?score_threshold=0", content=dark(), headers=RAW)
    assert none.status_code == 200 and none.json()["results"][0]["detections"] == []


def test_detect_runs_one_image_per_call(client) -> None:
    def calls() -> float:
        text = client.get("/metrics").text
        line = next(x for x in text.splitlines() if x.startswith('cae_batch_size_count{task="detect"}'))
        return float(line.split()[-1])

    before = calls()
    files = [
        ("files", (f"{i}.png", b, "image/png"))
        for i, b in enumerate((bright(), dark(50, 40), bright(30, 60)))
    ]
    r = client.post("/detect?masks=rle", files=files)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [len(x["detections"]) for x in res] == [2, 0, 2]
    assert [(x["width"], x["height"]) for x in res] == [(96, 144), (50, 40), (30, 60)]
    assert res[2]["detections"][0]["box"] == pytest.approx([2.5, 10.0, 12.5, 50.0])
    assert calls() - before == 3


def test_detect_masks_rle_and_png(client) -> None:
    body = client.post("/detect?masks=rle&score_threshold=0.2", content=bright(96, 144), headers=RAW).json()
    dets = body["results"][0]["detections"]
    assert body["mask_threshold"] == 0.5
    # independent reference: PIL's bilinear upscale of the graph's masks, thresholded (> 0.5)
    ref = [
        np.asarray(Image.fromarray(m[0], mode="F").resize((96, 144), Image.Resampling.BILINEAR)) > 0.5
        for m in det_masks()
    ]
    expected = ref[0]
    m0 = rle_decode(dets[0]["mask"])
    assert dets[0]["mask"]["size"] == [144, 96] and np.array_equal(m0, expected)
    ys, xs = np.nonzero(m0)  # its extent is the box scaled x2, y3: [8, 24, 40, 120]
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (8, 24, 40, 120)
    m1 = rle_decode(dets[1]["mask"])
    assert np.array_equal(m1, ref[1]) and not m1[72:].any() and not m1[:, :48].any()
    assert rle_decode(dets[2]["mask"]).all() and dets[2]["mask"]["counts"] == [0, 144 * 96]
    pngs = client.post("/detect?masks=png&score_threshold=0.2", content=bright(96, 144), headers=RAW).json()
    p0 = unpng(pngs["results"][0]["detections"][0]["mask"])
    assert p0.shape == (144, 96) and set(np.unique(p0)) == {0, 255} and np.array_equal(p0 > 127, expected)


def test_rle_and_label_map_units() -> None:
    m = np.array([[0, 1, 1], [0, 0, 1]], bool)
    rle = rle_encode(m)
    assert rle == {"size": [2, 3], "counts": [2, 1, 1, 2]}  # column-major: 0 0 | 1 | 0 | 1 1
    assert np.array_equal(rle_decode(rle), m)
    assert rle_encode(np.ones((2, 2), bool))["counts"] == [0, 4]
    assert rle_encode(np.zeros((2, 2), bool))["counts"] == [4]
    # many classes: 16-bit ids; large outputs are computed in row chunks with the same result
    logits = np.random.default_rng(0).standard_normal((300, 4, 5)).astype(np.float32)
    lm = label_map(logits, 9, 10)
    assert lm.dtype == np.uint16 and lm.shape == (9, 10) and lm.max() < 300


# ------------------------------------------------------------------------------------- errors, tasks
def _input_cases(route: str) -> list[tuple[str, str, dict[str, Any], int, str]]:
    cases = [c for c in error_cases() if c[1] == "/embed"]  # input rules (the option cases have a query)
    return [(name, route, kw, status, code) for name, _, kw, status, code in cases]


OPTION_CASES = [
    ("/segment?format=svg", "invalid_option"),
    ("/segment?overlay=maybe", "invalid_option"),
    ("/segment?overlay_alpha=0", "invalid_option"),
    ("/segment?overlay_alpha=1.5", "invalid_option"),
    ("/detect?score_threshold=1.5", "invalid_option"),
    ("/detect?score_threshold=-0.1", "invalid_option"),
    ("/detect?max_detections=0", "invalid_option"),
    ("/detect?max_detections=5000", "invalid_option"),
    ("/detect?masks=bitmap", "invalid_option"),
]


@pytest.mark.parametrize(
    ("name", "path", "kwargs", "status", "code"),
    _input_cases("/segment") + _input_cases("/detect"),
    ids=lambda v: v if isinstance(v, str) and not v.startswith("/") else None,
)
def test_bad_inputs(client, name: str, path: str, kwargs: dict[str, Any], status: int, code: str) -> None:
    r = client.post(path, **kwargs)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


@pytest.mark.parametrize(("path", "code"), OPTION_CASES)
def test_bad_options(client, path: str, code: str) -> None:
    r = client.post(path, content=bright(), headers=RAW)
    assert (r.status_code, r.json()["error"]["code"]) == (422, code), r.text


def test_bundle_without_the_tasks_answers_404(tiny_bundle: TinyBundle) -> None:
    with serve(tiny_bundle.path) as c:
        for route in ("/segment", "/detect"):
            r = c.post(route, content=bright(), headers=RAW)
            err = r.json()["error"]
            assert r.status_code == 404 and err["code"] == "task_not_available"
            assert route[1:] in err["message"] and "has no" in err["message"]
        assert c.post("/embed", content=bright(), headers=RAW).status_code == 200


def test_torch_backend_reports_the_dense_heads_unavailable(dense_bundle: Path) -> None:
    pytest.importorskip("torch")
    with serve(dense_bundle, backend="torch") as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["tasks"] == ["embed", "reconstruct"]
        assert set(card["unavailable_tasks"]) == {"segment", "detect"}
        for route in ("/segment", "/detect"):
            r = c.post(route, content=bright(), headers=RAW)
            err = r.json()["error"]
            assert r.status_code == 501 and err["code"] == "task_unsupported_by_backend"
            assert "torch" in err["message"] and "onnxruntime" in err["message"]
        assert c.post("/embed", content=bright(), headers=RAW).status_code == 200


def test_embed_models_and_openapi_with_dense_tasks(client) -> None:
    r = client.post("/embed", content=bright(), headers=RAW)
    assert r.status_code == 200 and r.json()["shape"] == [1, 64]
    card = client.get("/v1/models").json()["data"][0]
    assert card["tasks"] == ["embed", "reconstruct", "segment", "detect"] and card["unavailable_tasks"] == {}
    api = client.get("/openapi.json").json()
    assert {"format", "overlay", "overlay_alpha"} <= {
        p["name"] for p in api["paths"]["/segment"]["post"]["parameters"]
    }
    assert {"score_threshold", "max_detections", "masks"} <= {
        p["name"] for p in api["paths"]["/detect"]["post"]["parameters"]
    }


def test_openvino_runs_the_dense_heads_like_onnxruntime(dense_bundle: Path) -> None:
    pytest.importorskip("openvino")
    from service.backends.onnxruntime import OnnxRuntimeBackend
    from service.backends.openvino import OpenVinoBackend

    bundle = load_bundle(dense_bundle)
    ov, ref = OpenVinoBackend(), OnnxRuntimeBackend()
    ov.load(bundle, "fp32")
    ref.load(bundle, "fp32")
    x = np.random.default_rng(0).standard_normal((2, 3, S, S)).astype(np.float32)
    np.testing.assert_allclose(
        ov.infer("segment", {"images": x}), ref.infer("segment", {"images": x}), atol=1e-5
    )
    for img in (np.abs(x[:1]), -np.abs(x[:1])):  # N = 3, then N = 0
        a, b = ov.infer_outputs("detect", {"images": img}), ref.infer_outputs("detect", {"images": img})
        assert list(a) == list(b) == ["boxes", "labels", "scores", "masks"]
        for k in a:
            np.testing.assert_allclose(a[k], b[k])


def test_dense_spec_needs_classes(dense_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "b"
    shutil.copytree(dense_bundle, bad)
    spec = json.loads((bad / "spec.json").read_text())
    del spec["tasks"]["segment"]["classes"]
    (bad / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match="classes"):
        load_bundle(bad)


def test_serving_dense_heads_never_imports_torch(dense_bundle: Path) -> None:
    out = run_torchless_driver(dense_bundle, ["/embed", "/segment?overlay=true", "/detect?masks=rle"])
    assert out["attempts"] == [] and out["torch"] is False, out
    assert out["used"][0] == "onnxruntime" and set(out["used"][1].split("+")) <= {
        "openvino",
        "onnxruntime",
    }  # auto: per task


# --------------------------------------------------------------------------- fast post-processing
def _smooth_logits(c: int, h: int, w: int, seed: int) -> np.ndarray:
    """Logits like a real head's: smooth class fields (a few boundaries) plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((c, max(1, h // 6), max(1, w // 6))).astype(np.float32)
    up = np.stack([np.asarray(Image.fromarray(x).resize((w, h), Image.Resampling.BILINEAR)) for x in coarse])
    return (up + 0.05 * rng.standard_normal((c, h, w))).astype(np.float32)


@pytest.mark.parametrize(
    ("c", "h", "w", "height", "width"),
    [(11, 64, 64, 333, 517), (11, 64, 64, 40, 30), (300, 8, 6, 9, 31), (3, 1, 1, 5, 7), (4, 16, 16, 16, 16)],
)
def test_label_map_equals_the_full_resize(c: int, h: int, w: int, height: int, width: int) -> None:
    """The uniform-cell shortcut gives exactly the argmax of the full bilinear resize, smooth or noisy."""
    from service.dense import label_map_reference

    for seed in range(3):
        for logits in (_smooth_logits(c, h, w, seed), np.random.default_rng(seed).standard_normal((c, h, w))):
            logits = logits.astype(np.float32)
            assert np.array_equal(
                label_map(logits, height, width), label_map_reference(logits, height, width)
            )


def test_mask_window_rle_and_png_equal_the_full_mask() -> None:
    from service.dense import mask_png, mask_window, resize_mask, rle_window

    rng = np.random.default_rng(0)
    for height, width in ((50, 40), (7, 9), (300, 517)):
        for trial in range(15):
            prob = np.zeros((1, 32, 32), np.float32)
            if trial:  # trial 0: an empty mask
                y, x = rng.integers(0, 32, 2)
                prob[0, y : y + rng.integers(1, 12), x : x + rng.integers(1, 12)] = rng.uniform(0.3, 1.0)
            full = np.zeros((height, width), bool)
            from service.dense import resized_rows

            for rows, chunk in resized_rows(prob, height, width):
                full[rows] = chunk[0] > 0.5
            y0, x0, crop = mask_window(prob, height, width)
            assert np.array_equal(resize_mask(prob, height, width), full)
            assert rle_window(height, width, y0, x0, crop) == rle_encode(full)
            assert np.array_equal(rle_decode(rle_window(height, width, y0, x0, crop)), full)
            png_mask = np.asarray(Image.open(io.BytesIO(mask_png(height, width, y0, x0, crop))))
            assert png_mask.dtype == np.uint8 and np.array_equal(png_mask, full.astype(np.uint8) * 255)


def test_fast_png_and_overlay_match_the_reference() -> None:
    from service.dense import overlay, overlay_reference, png_bytes

    rng = np.random.default_rng(1)
    for arr in (
        rng.integers(0, 256, (30, 17), dtype=np.uint8),
        rng.integers(0, 256, (9, 5, 3), dtype=np.uint8),
        rng.integers(0, 700, (6, 4)).astype(np.uint16),
    ):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(arr)))), arr)
    img = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    labels = rng.integers(0, 5, (40, 60)).astype(np.uint8)
    for alpha in (0.3, 0.5, 1.0):
        got, ref = (
            overlay(img, labels, 5, alpha).astype(int),
            overlay_reference(img, labels, 5, alpha).astype(int),
        )
        assert np.abs(got - ref).max() <= (0 if alpha == 1.0 else 1)
        assert np.array_equal(got[labels == 0], np.asarray(img)[labels == 0])


def test_segment_overlay_format_follows_the_input(client) -> None:
    img = stripes(64, 80)
    as_png = client.post("/segment?overlay=true", content=png(img), headers=RAW).json()["results"][0]
    assert as_png["overlay_format"] == "png" and base64.b64decode(as_png["overlay"])[:4] == b"\x89PNG"
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    jpeg_headers = {**RAW, "content-type": "image/jpeg"}
    as_jpeg = client.post("/segment?overlay=true", content=buf.getvalue(), headers=jpeg_headers).json()
    res = as_jpeg["results"][0]
    assert res["overlay_format"] == "jpeg" and base64.b64decode(res["overlay"])[:3] == b"\xff\xd8\xff"
    forced = client.post(
        "/segment?overlay=true&overlay_format=png", content=buf.getvalue(), headers=jpeg_headers
    )
    assert forced.json()["results"][0]["overlay_format"] == "png"
    assert client.post("/segment?overlay_format=gif", content=png(img), headers=RAW).status_code == 422
