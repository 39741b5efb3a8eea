"""service/client.py against a real server process (uvicorn on a free port, API keys on): the same
numbers as the JSON routes, binary transport, retries on 429/503 honouring Retry-After, no torch."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.client import CAEClient, CAEServiceError, Detections, Reconstruction, Segmentation
from tests.helpers import (
    REPO,
    Server,
    TinyBundle,
    build_dense_bundle,
    image_array,
    png_bytes,
    running_server,
)

KEY = "client-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_bundle: TinyBundle, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("client")
    bundle = build_dense_bundle(tiny_bundle, root / "bundle")
    with running_server(bundle, root / "server.log", CAE_API_KEYS=KEY) as s:
        yield s


@pytest.fixture()
def cae(server: Server):
    with CAEClient(server.url, api_key=KEY) as c:
        yield c


def _json(server: Server, path: str, data: bytes, **params: Any) -> dict[str, Any]:
    r = httpx.post(
        f"{server.url}{path}",
        params=params,
        content=data,
        headers={**AUTH, "content-type": "image/png", "accept": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _unpng(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_client_imports_without_torch() -> None:
    code = "import sys, service.client; print('torch' in sys.modules, 'training' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr


def test_embed_equals_the_json_route_for_every_input_kind(
    cae: CAEClient, server: Server, tmp_path: Path
) -> None:
    a, b = png_bytes(seed=1), png_bytes(seed=2)
    path = tmp_path / "b.png"
    path.write_bytes(b)
    ref = np.asarray(_json(server, "/embed", a)["embeddings"] + _json(server, "/embed", b)["embeddings"])
    for inputs in ([a, b], [image_array(seed=1), path], (Image.open(io.BytesIO(a)), b)):
        out = cae.embed(inputs)
        assert out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-5)
    one = cae.embed(a, pooling="none", normalize=True, dtype="float16")
    dim = ref.shape[-1]
    assert one.dtype == np.float16 and one.ndim == 3 and one.shape[0] == 1 and one.shape[2] == dim
    np.testing.assert_allclose(np.linalg.norm(one.astype(np.float32), axis=-1), 1, atol=2e-3)


def test_reconstruct_equals_the_json_route(cae: CAEClient, server: Server) -> None:
    img = png_bytes(seed=3)
    rec = cae.reconstruct(img, mask_ratio=0.25, seed=7)
    assert isinstance(rec, Reconstruction) and rec.seed == 7 and rec.masked_count == 4
    assert rec.mask_ratio == pytest.approx(0.25) and rec.model
    ref = _json(server, "/reconstruct", img, mask_ratio=0.25, seed=7)
    for name in ("original", "masked", "reconstruction"):
        np.testing.assert_array_equal(getattr(rec, name), _unpng(ref["images"][name]))
    explicit = cae.reconstruct(img, masked=[0, 5])
    assert explicit.masked_count == 2 and explicit.seed is None


def test_segment_one_image_as_png_and_several_as_json(cae: CAEClient, server: Server) -> None:
    a = png_bytes(100, 60, seed=4)
    b = png_bytes(50, 70, seed=5)
    (one,) = cae.segment(a)
    ref = _json(server, "/segment", a, format="json")
    assert isinstance(one, Segmentation) and one.labels.shape == (60, 100)
    np.testing.assert_array_equal(one.labels, np.asarray(ref["results"][0]["labels"]))
    assert one.classes == ref["classes"] and sum(one.class_pixels().values()) == 6000
    two = cae.segment([a, b], overlay=True)
    assert [s.labels.shape for s in two] == [(60, 100), (70, 50)]
    np.testing.assert_array_equal(two[0].labels, one.labels)
    assert two[1].overlay is not None and two[1].overlay.shape == (70, 50, 3)


def test_detect_decodes_boxes_and_masks(cae: CAEClient, server: Server) -> None:
    img = png_bytes(96, 144, seed=6)
    ref = _json(server, "/detect", img, score_threshold=0.0, masks="png")["results"][0]
    (rle,) = cae.detect(img, score_threshold=0.0, masks="rle")
    (png,) = cae.detect([img], score_threshold=0.0, masks="png")
    assert isinstance(rle, Detections) and (rle.width, rle.height) == (96, 144)
    assert len(rle.detections) == len(ref["detections"])
    np.testing.assert_allclose(rle.boxes, [d["box"] for d in ref["detections"]], atol=1e-4)
    for d, p, r in zip(rle.detections, png.detections, ref["detections"], strict=True):
        assert (
            d.label == r["label"] and d.label_name == r["label_name"] and d.score == pytest.approx(r["score"])
        )
        assert d.mask is not None and d.mask.shape == (144, 96) and d.mask.dtype == bool
        np.testing.assert_array_equal(d.mask, p.mask)
        np.testing.assert_array_equal(d.mask, _unpng(r["mask"]) > 127)
    (none,) = cae.detect(img, score_threshold=0.0)
    assert all(d.mask is None for d in none.detections) and none.scores.shape == (len(ref["detections"]),)


def test_api_key_and_error_answers(server: Server) -> None:
    with CAEClient(server.url) as anon:
        with pytest.raises(CAEServiceError) as e:
            anon.embed(png_bytes())
        assert e.value.status == 401 and e.value.code == "unauthorized"
        assert anon.health() and anon.ready()  # probes stay open
    with CAEClient(server.url, api_key=KEY) as cae:
        with pytest.raises(CAEServiceError) as e:
            cae.embed(png_bytes(8, 8))
        assert e.value.status == 422 and e.value.code == "image_too_small" and e.value.limit == 16
        assert cae.model()["tasks"] == ["embed", "reconstruct", "segment", "detect"]


class Recorder(httpx.BaseTransport):
    """The real transport behind a recorder that can answer the first requests itself (429/503)."""

    def __init__(self, refusals: list[httpx.Response] | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.refusals = list(refusals or [])
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if self.refusals:
            return self.refusals.pop(0)
        return self.inner.handle_request(request)


def _refusal(status: int, retry_after: str | None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after else {}
    return httpx.Response(status, headers=headers, json={"error": {"code": "queue_full", "message": "busy"}})


def test_binary_transport_by_default(server: Server) -> None:
    rec = Recorder()
    with CAEClient(server.url, api_key=KEY, transport=rec) as cae:
        cae.embed(png_bytes())
        cae.embed([png_bytes(seed=1), png_bytes(seed=2)])
        cae.reconstruct(png_bytes())
        cae.segment(png_bytes())
        cae.detect(png_bytes())
    posts = [r for r in rec.requests if r.method == "POST"]  # segment also reads the class names (GET)
    kinds = [(r.url.path, r.headers["content-type"].split(";")[0], r.headers.get("accept")) for r in posts]
    assert kinds[0] == ("/embed", "application/octet-stream", "application/x-npy")
    assert kinds[1] == ("/embed", "multipart/form-data", "application/x-npy")
    assert kinds[2] == ("/reconstruct", "application/octet-stream", "image/png")
    assert kinds[3][:2] == ("/segment", "application/octet-stream") and kinds[3][2] == "image/png"
    assert [k[0] for k in kinds] == ["/embed", "/embed", "/reconstruct", "/segment", "/detect"]
    for r in posts:
        assert b"base64" not in r.content[:200] and not r.content.startswith(b"{")
        assert r.headers["authorization"] == f"Bearer {KEY}"


def test_retries_honour_retry_after_then_succeed(server: Server) -> None:
    rec = Recorder([_refusal(429, "2"), _refusal(503, "1"), _refusal(503, None)])
    waits: list[float] = []
    with CAEClient(server.url, api_key=KEY, transport=rec, retries=3) as cae:
        cae._sleep = waits.append
        out = cae.embed(png_bytes())
    assert out.shape[0] == 1 and len(rec.requests) == 4
    assert waits == [2.0, 1.0, 2.0]  # Retry-After as sent; without one, backoff 0.5 * 2**attempt
    assert all(r.content == rec.requests[0].content for r in rec.requests)  # the same body each time


def test_retries_give_up_with_the_servers_error(server: Server) -> None:
    rec = Recorder([_refusal(429, "100"), _refusal(429, "100")])
    waits: list[float] = []
    with CAEClient(server.url, api_key=KEY, transport=rec, retries=1, max_retry_wait_s=5) as cae:
        cae._sleep = waits.append
        with pytest.raises(CAEServiceError) as e:
            cae.embed(png_bytes())
    assert e.value.status == 429 and e.value.code == "queue_full" and waits == [5.0]  # capped
