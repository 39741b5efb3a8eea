"""The /embed fast path (service/fast.py: EmbedFastPath): the common call skips FastAPI's dependency
solving but answers exactly what the route answers; every other call still goes through FastAPI."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.helpers import TinyBundle, png_bytes, serve


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths whose requests went through FastAPI's dependency solving."""
    import fastapi.routing

    seen: list[str] = []
    real = fastapi.routing.solve_dependencies

    async def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        request = kwargs.get("request")
        seen.append(getattr(request, "url", None).path if request is not None else "?")
        return await real(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return seen


def test_fast_path_answers_as_the_route(tiny_bundle: TinyBundle, solved: list[str]) -> None:
    img = png_bytes(seed=3)
    body = {"images": [base64.b64encode(img).decode()]}
    with serve(tiny_bundle.path) as c:
        fast = c.post("/embed", json=body)
        assert fast.status_code == 200 and solved == []  # no dependency solving
        slow = c.post("/embed?normalize=false", json=body)  # an option: FastAPI validates it
        assert slow.status_code == 200 and solved == ["/embed"]
        assert fast.json() == slow.json()
        raw = c.post(
            "/embed", content=img, headers={"content-type": "image/png", "accept": "application/x-npy"}
        )
        assert raw.headers["content-type"] == "application/x-npy" and len(solved) == 1
        npy = np.load(__import__("io").BytesIO(raw.content))
        np.testing.assert_allclose(npy, np.asarray(fast.json()["embeddings"], np.float32), atol=1e-6)
        # errors: the same codes and bodies as the route's own handlers, counted in the same metrics
        bad = c.post("/embed", content=b"{", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_json"
        assert c.post("/embed", content=img, headers={"content-type": "text/csv"}).status_code == 415
        assert (
            c.post(
                "/embed", content=img, headers={"content-type": "image/png", "accept": "text/csv"}
            ).status_code
            == 406
        )
        metrics = c.get("/metrics").text
        assert 'cae_http_requests_total{method="POST",route="/embed",status="200"} 3.0' in metrics
        assert 'cae_rejections_total{reason="bad_json"} 1.0' in metrics
        # a client deadline is a header the route validates: FastAPI's path
        assert c.post("/embed", json=body, headers={"x-request-timeout": "0"}).status_code == 422
        assert solved[-1] == "/embed"


def test_fast_path_steps_aside_when_keys_are_configured(tiny_bundle: TinyBundle, solved: list[str]) -> None:
    with serve(tiny_bundle.path, api_keys="k1") as c:
        r = c.post("/embed", content=png_bytes(), headers={"content-type": "image/png"})
        assert r.status_code == 401 and solved == ["/embed"]
        ok = c.post("/embed", content=png_bytes(), headers={"content-type": "image/png", "x-api-key": "k1"})
        assert ok.status_code == 200
