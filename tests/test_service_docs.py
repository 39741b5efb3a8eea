"""/docs and /redoc work offline (assets from the installed package, no CDN), and every route, the docs'
included, is counted under its own label in /metrics."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.browser import render
from tests.helpers import TinyBundle, running_server, serve


@pytest.fixture(scope="module")
def client(tiny_bundle: TinyBundle):
    with serve(tiny_bundle.path) as c:
        yield c


def _references(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_load_only_same_origin_assets(client, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = _references(r.text)
    assert refs and not re.search(r"https?://|//cdn|fonts\.googleapis", r.text), r.text
    for ref in refs:
        asset = client.get(ref)
        assert asset.status_code == 200 and len(asset.content) > 1000, ref
    kinds = {client.get(ref).headers["content-type"].split(";")[0] for ref in refs}
    assert "text/javascript" in kinds


def test_unknown_doc_asset_is_404(client) -> None:
    for path in ("/docs/assets/nope.js", "/docs/assets/..%2Fcore.py"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_metrics_label_docs_and_openapi_by_route(client) -> None:
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui.css", "/no-such-route"):
        client.get(path)
    lines = [x for x in client.get("/metrics").text.splitlines() if x.startswith("cae_http_requests_total{")]
    for route in ("/docs", "/redoc", "/openapi.json", "/docs/assets/{name}"):
        assert any(f'route="{route}",status="200"' in x for x in lines), (route, lines)
    unmatched = [x for x in lines if 'route="unmatched"' in x]
    assert unmatched and all('status="404"' in x for x in unmatched), unmatched


def test_docs_render_operations_in_headless_chromium_offline(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    with running_server(tiny_bundle.path, tmp_path / "server.log") as server:
        swagger = render(
            f"{server.url}/docs", "document.querySelector('.opblock-summary-path[data-path=\"/detect\"]')"
        ).dom
        redoc = render(f"{server.url}/redoc", "document.body.innerHTML.includes('operation/detect')").dom
    paths = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', swagger))
    assert {"/embed", "/reconstruct", "/segment", "/detect", "/v1/models"} <= paths, swagger[-2000:]
    operations = set(re.findall(r"operation/(\w+)", redoc))
    assert {"embed", "reconstruct", "segment", "detect"} <= operations, redoc[-2000:]
