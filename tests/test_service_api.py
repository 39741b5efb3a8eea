"""The HTTP contract through the real app (TestClient, real ONNX Runtime backend on a tiny bundle)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from service.bundle import load_bundle
from service.imaging import Limits, Preprocessor
from service.postprocess import reconstruct as reconstruct_pixels
from tests.helpers import (
    CASE_LIMITS,
    TinyBundle,
    error_cases,
    png_b64,
    png_bytes,
    serve,
)

RAW = {"content-type": "image/png"}
NPY = {"accept": "application/x-npy"}


@pytest.fixture(scope="module")
def client(tiny_bundle: TinyBundle):
    with serve(tiny_bundle.path, **CASE_LIMITS) as c:
        yield c


def _npy(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def test_health_ready_models_docs(client, tiny_bundle: TinyBundle) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["backend"] == "onnxruntime fp32"
    models = client.get("/v1/models").json()
    card = models["data"][0]
    assert card["id"] == tiny_bundle.spec["model"]["id"] and card["backend"]["name"] == "onnxruntime"
    assert card["backend"]["precision"] == "fp32" and card["spec"] == tiny_bundle.spec
    assert card["tasks"] == ["embed", "reconstruct"] and card["limits"]["max_images_per_request"] == 3
    assert client.get(f"/v1/models/{card['id']}").json()["id"] == card["id"]
    assert client.get("/v1/models/other").json()["error"]["code"] == "model_not_found"
    assert client.get("/docs").status_code == 200
    api = client.get("/openapi.json").json()
    body = api["paths"]["/embed"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json", "image/*"}
    params = {p["name"] for p in api["paths"]["/embed"]["post"]["parameters"]}
    assert {"pooling", "normalize", "dtype"} <= params
    assert api["paths"]["/embed"]["post"]["operationId"] == "embed"
    assert {"mask_ratio", "seed", "masked", "view"} <= {
        p["name"] for p in api["paths"]["/reconstruct"]["post"]["parameters"]
    }


def test_every_input_form_gives_the_same_embedding(client) -> None:
    a, b = png_bytes(seed=1), png_bytes(50, 20, seed=2)
    single = client.post("/embed", files={"file": ("a.png", a, "image/png")}).json()
    assert single["shape"] == [1, 64] and single["dim"] == 64 and single["patch_grid"] is None
    multi = client.post(
        "/embed", files=[("files", ("a.png", a, "image/png")), ("files", ("b.png", b, "image/png"))]
    )
    mixed = client.post(
        "/embed", files=[("file", ("a.png", a, "image/png")), ("files", ("b.png", b, "image/png"))]
    )
    as_json = client.post(
        "/embed", json={"images": [base64.b64encode(a).decode(), base64.b64encode(b).decode()]}
    )
    data_uri = client.post("/embed", json={"image": "data:image/png;base64," + base64.b64encode(a).decode()})
    raw = client.post("/embed", content=a, headers=RAW)
    octet = client.post("/embed", content=b, headers={"content-type": "application/octet-stream"})
    ref = np.asarray(multi.json()["embeddings"])
    assert ref.shape == (2, 64)
    for r, rows in ((mixed, ref), (as_json, ref), (data_uri, ref[:1]), (raw, ref[:1]), (octet, ref[1:])):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["embeddings"]), rows, atol=1e-6)
    np.testing.assert_allclose(np.asarray(single["embeddings"]), ref[:1], atol=1e-6)


def test_pooling_normalize_dtype_and_npy(client) -> None:
    img = png_bytes(seed=3)
    tokens = _npy(client.post("/embed?pooling=none", content=img, headers={**RAW, **NPY}))
    assert tokens.shape == (1, 16, 64) and tokens.dtype == np.float32
    r = client.post("/embed?pooling=none", content=img, headers={**RAW, **NPY})
    assert (
        r.headers["x-shape"] == "1,16,64"
        and r.headers["x-patch-grid"] == "4,4"
        and r.headers["x-dtype"] == "float32"
    )
    js = client.post("/embed?pooling=none", content=img, headers=RAW).json()
    assert js["patch_grid"] == [4, 4] and js["shape"] == [1, 16, 64]
    np.testing.assert_allclose(np.asarray(js["embeddings"]), tokens, atol=1e-6)
    mean = _npy(client.post("/embed?pooling=mean", content=img, headers={**RAW, **NPY}))
    np.testing.assert_allclose(mean, tokens.mean(1), atol=1e-5)
    cls = _npy(client.post("/embed", content=img, headers={**RAW, **NPY}))
    unit = _npy(client.post("/embed?normalize=true", content=img, headers={**RAW, **NPY}))
    np.testing.assert_allclose(unit, cls / np.linalg.norm(cls, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    half = _npy(client.post("/embed?dtype=float16&normalize=true", content=img, headers={**RAW, **NPY}))
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), unit, atol=1e-3)
    half_json = client.post("/embed?dtype=float16&normalize=true", content=img, headers=RAW).json()
    assert half_json["dtype"] == "float16" and half_json["normalized"] is True
    np.testing.assert_allclose(np.asarray(half_json["embeddings"]), half.astype(np.float32), atol=0)
    # Accept with q-values: npy preferred over json
    r = client.post(
        "/embed", content=img, headers={**RAW, "accept": "application/json;q=0.5, application/x-npy"}
    )
    assert r.headers["content-type"] == "application/x-npy"


def test_embeddings_equal_onnxruntime_and_close_to_torch(client, tiny_bundle: TinyBundle) -> None:
    import onnxruntime as ort

    bundle = load_bundle(tiny_bundle.path)
    pre = Preprocessor(bundle.image, Limits(10**8, 1))
    imgs = [png_bytes(64, 48, seed=s) for s in range(3)]
    x = np.stack([pre(b) for b in imgs])
    ref = ort.InferenceSession(str(tiny_bundle.path / "embed.onnx")).run(["tokens"], {"images": x})[0]
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(imgs)]
    got = _npy(client.post("/embed?pooling=none", files=files, headers=NPY))
    np.testing.assert_allclose(got, ref[:, 1:], rtol=0, atol=1e-5)
    cls = _npy(client.post("/embed", files=files, headers=NPY))
    np.testing.assert_allclose(cls, ref[:, 0], rtol=0, atol=1e-5)
    with torch.no_grad():
        ref_torch = tiny_bundle.model.forward_features(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(cls, ref_torch[:, 0], rtol=0, atol=1e-4)


def test_reconstruct_png_and_json(client) -> None:
    from PIL import Image

    img = png_bytes(seed=4)
    r = client.post("/reconstruct?seed=7", content=img, headers=RAW)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "7" and r.headers["x-masked-count"] == "8"  # default ratio 0.5 of 16
    assert Image.open(io.BytesIO(r.content)).size == (96, 32)  # original | masked | reconstruction
    only = client.post(
        "/reconstruct?view=reconstruction&mask_ratio=0.25&seed=7", files={"file": ("a.png", img)}
    )
    assert Image.open(io.BytesIO(only.content)).size == (32, 32) and only.headers["x-masked-count"] == "4"
    js = client.post(
        "/reconstruct?mask_ratio=0.25&seed=7", content=img, headers={**RAW, "accept": "application/json"}
    )
    body = js.json()
    assert js.status_code == 200 and body["seed"] == 7 and len(body["masked_indices"]) == 4
    assert body["mask_ratio"] == 0.25 and body["grid"] == [4, 4] and body["patch_size"] == 8
    assert sum(map(sum, body["mask"])) == 4 and len(body["per_patch_error"]) == 4
    assert body["mean_error"] == pytest.approx(np.mean(body["per_patch_error"]))
    for k in ("original", "masked", "reconstruction"):
        assert Image.open(io.BytesIO(base64.b64decode(body["images"][k]))).size == (32, 32)
    again = client.post(
        "/reconstruct?mask_ratio=0.25&seed=7",
        json={"image": png_b64(seed=4)},
        headers={"accept": "application/json"},
    ).json()
    assert again["masked_indices"] == body["masked_indices"] and again["images"] == body["images"]
    explicit = client.post(
        "/reconstruct?masked=15,0,5", content=img, headers={**RAW, "accept": "application/json"}
    )
    assert explicit.json()["masked_indices"] == [0, 5, 15] and explicit.json()["seed"] is None
    assert "x-seed" not in explicit.headers


def test_reconstruction_matches_torch(tiny_bundle: TinyBundle) -> None:
    """The service's de-normalization equals CAE.reconstruct (the training-side visualization)."""
    import onnxruntime as ort

    bundle = load_bundle(tiny_bundle.path)
    pre = Preprocessor(bundle.image, Limits(10**8, 1))
    x = pre(png_bytes(seed=5))[None]
    idx = np.array([1, 2, 6, 9, 13])
    mask = np.zeros((1, 16), dtype=bool)
    mask[0, idx] = True
    (pred,) = ort.InferenceSession(str(tiny_bundle.path / "reconstruct.onnx")).run(
        None, {"images": x, "mask": mask}
    )
    ours = reconstruct_pixels(x[0], idx, pred[0], bundle.image, bundle.norm_pix_loss)
    with torch.no_grad():
        ref = tiny_bundle.model.reconstruct(torch.from_numpy(x), torch.from_numpy(mask))[0].numpy()
    assert bundle.norm_pix_loss
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    visible = np.setdiff1d(np.arange(16), idx)
    from service.postprocess import patchify

    np.testing.assert_array_equal(patchify(ours, 8)[visible], patchify(x[0], 8)[visible])


@pytest.mark.parametrize("case", error_cases(), ids=lambda c: c[0])
def test_error_paths(client, case) -> None:
    _, path, kwargs, status, code = case
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    if status == 413 and code != "body_too_large":
        assert body["error"]["limit"] in (3, 1, 1_000_000)


def test_chunked_body_over_the_limit(client) -> None:
    def gen():
        for _ in range(40):
            yield b"\x89PNG" + b"0" * 10_000

    r = client.post("/embed", content=gen(), headers=RAW)
    assert r.status_code == 413 and r.json()["error"] == {
        "code": "body_too_large",
        "message": "request body larger than 300000 bytes",
        "limit": 300_000,
    }


def test_reconstruct_refuses_dalle_bundles(tiny_bundle: TinyBundle) -> None:
    with serve(tiny_bundle.dalle_path) as c:
        r = c.post("/reconstruct", content=png_bytes(), headers=RAW)
        assert r.status_code == 422 and r.json()["error"]["code"] == "needs_pixel_target"
        assert "pixel-target" in r.json()["error"]["message"]
        assert c.post("/embed", content=png_bytes(), headers=RAW).status_code == 200


def test_api_keys(tiny_bundle: TinyBundle) -> None:
    with serve(tiny_bundle.path, api_keys="alpha-key, beta-key") as c:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(path).status_code == 200
        r = c.post("/embed", content=png_bytes(), headers=RAW)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
        assert c.get("/v1/models").status_code == 401
        assert (
            c.post(
                "/embed", content=png_bytes(), headers={**RAW, "authorization": "Bearer wrong"}
            ).status_code
            == 401
        )
        assert c.post("/embed", content=png_bytes(), headers={**RAW, "x-api-key": "alpha"}).status_code == 401
        assert (
            c.post(
                "/embed", content=png_bytes(), headers={**RAW, "authorization": "Bearer beta-key"}
            ).status_code
            == 200
        )
        assert (
            c.post("/reconstruct", content=png_bytes(), headers={**RAW, "x-api-key": "alpha-key"}).status_code
            == 200
        )
        assert c.get("/v1/models", headers={"x-api-key": "beta-key"}).status_code == 200
        assert "alpha-key" not in c.get("/v1/models", headers={"x-api-key": "beta-key"}).text


def test_metrics_count_routes_rejections_and_batches(client) -> None:
    client.post("/embed", content=png_bytes(), headers=RAW)
    client.post("/embed", content=b"", headers=RAW)
    text = client.get("/metrics").text
    assert 'cae_http_requests_total{method="POST",route="/embed",status="200"}' in text
    assert 'cae_rejections_total{reason="empty_body"}' in text
    assert (
        'cae_batch_size_count{task="embed"}' in text and 'cae_queue_wait_seconds_count{task="embed"}' in text
    )
    assert 'cae_http_request_duration_seconds_bucket{le="0.005",route="/embed"}' in text
    assert "cae_ready 1.0" in text and 'cae_model_info{backend="onnxruntime"' in text
