"""The demo page at / : served offline, off with CAE_DEMO=false, the bundle's gallery, and in headless
Chromium (network off) every panel renders: reconstruction at the chosen mask ratio, segmentation
overlay, detections drawn on the image, nearest neighbours among the gallery (screenshot checked)."""

from __future__ import annotations

import html
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import render
from tests.helpers import (
    TinyBundle,
    build_dense_bundle,
    encode,
    image_array,
    running_server,
    serve,
)

WINDOW = (1280, 1400)
PANELS = ("reconstruct", "segment", "detect", "neighbours")


@pytest.fixture(scope="session")
def gallery_bundle(tiny_bundle: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dense test bundle with a gallery of 6 images (plus files the gallery must ignore)."""
    bundle = build_dense_bundle(tiny_bundle, tmp_path_factory.mktemp("demo") / "bundle")
    gallery = bundle / "gallery"
    gallery.mkdir()
    for i in range(6):
        img = Image.fromarray(image_array(64 + 8 * i, 48 + 4 * i, seed=i))
        (gallery / f"g{i}.png").write_bytes(encode(img))
    (gallery / "notes.txt").write_text("not an image")
    (gallery / "fake.png").write_bytes(b"not a png at all")
    os.symlink(bundle / "spec.json", gallery / "link.png")
    return bundle


@pytest.fixture(scope="module")
def client(gallery_bundle: Path):
    with serve(gallery_bundle) as c:
        yield c


def test_demo_page_is_served_with_same_origin_assets_only(client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text)
    assert "/demo/assets/demo.js" in refs and "/demo/assets/demo.css" in refs
    for ref in refs:
        assert ref.startswith("/"), ref
        assert client.get(ref).status_code == 200, ref
    js = client.get("/demo/assets/demo.js").text
    assert not re.search(r"https?://", js + r.text + client.get("/demo/assets/demo.css").text)
    assert client.get("/demo/assets/other.js").status_code == 404
    assert "/" not in client.get("/openapi.json").json()["paths"]  # a page, not an API operation


def test_gallery_lists_and_serves_only_image_files(client, gallery_bundle: Path) -> None:
    names = client.get("/demo/gallery").json()["images"]
    assert names == [f"g{i}.png" for i in range(6)]  # not fake.png (bytes), link.png (a link), notes.txt
    r = client.get("/demo/gallery/g2.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (gallery_bundle / "gallery" / "g2.png").read_bytes()
    for bad in ("fake.png", "link.png", "notes.txt", "..%2Fspec.json", "nope.png"):
        assert client.get(f"/demo/gallery/{bad}").status_code == 404, bad


def test_demo_off_and_gallery_behind_api_keys(gallery_bundle: Path) -> None:
    with serve(gallery_bundle, demo=False) as c:
        assert c.get("/").status_code == 404 and c.get("/demo/assets/demo.js").status_code == 404
        assert c.get("/demo/gallery").status_code == 404
    with serve(gallery_bundle, api_keys="k1") as c:
        assert c.get("/").status_code == 200  # the page is open; what it calls needs the key
        assert c.get("/demo/gallery").status_code == 401
        assert c.get("/demo/gallery", headers={"x-api-key": "k1"}).json()["images"][0] == "g0.png"


def _panels(dom: str) -> dict[str, dict[str, str]]:
    out = {}
    for m in re.finditer(r'<article class="panel" id="panel-(\w+)"([^>]*)>', dom):
        attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', m.group(2)))
        out[m.group(1)] = attrs
    return out


def _note(dom: str, panel: str) -> str:
    m = re.search(rf'id="panel-{panel}".*?<p class="note">(.*?)</p>', dom, re.S)
    return html.unescape(m.group(1)) if m else ""


def _crop_is_a_picture(shot: Image.Image, rect: str) -> None:
    x, y, w, h = (int(v) for v in rect.split(","))
    assert w > 20 and h > 20, rect
    crop = np.asarray(shot.convert("RGB").crop((x, y, x + w, y + h))).reshape(-1, 3)
    colours = len(np.unique(crop, axis=0))
    assert colours > 50 and crop.std() > 10, (rect, colours, crop.std())


def test_demo_renders_every_panel_in_headless_chromium(gallery_bundle: Path, tmp_path: Path) -> None:
    done = "document.body.dataset.done"
    with running_server(gallery_bundle, tmp_path / "server.log") as server:
        page = render(f"{server.url}/?example=1&mask_ratio=0.25", done, size=WINDOW)
        # the same page at another mask ratio masks another number of patches
        dom_75 = render(f"{server.url}/?example=1&mask_ratio=0.75", done, size=WINDOW).dom
    dom = page.dom
    (tmp_path / "demo.png").write_bytes(page.png)
    assert 'data-done="1"' in dom, dom[-3000:]
    panels = _panels(dom)
    assert {p: panels[p]["state"] for p in PANELS} == dict.fromkeys(PANELS, "done"), (panels, dom[-3000:])
    assert _note(dom, "reconstruct").startswith(
        "4 patches masked (ratio 0.25)"
    )  # 16 patches in the tiny model
    assert _note(dom_75, "reconstruct").startswith("12 patches masked (ratio 0.75)")
    detections = re.findall(r'<ol class="list" id="detect-list">(.*?)</ol>', dom, re.S)[0]
    assert detections.count("<li>") >= 1 and "thing" in detections + dom
    captions = re.findall(r"<figcaption>(\S+) ([^<]+)</figcaption>", dom)
    assert len(captions) == 6, captions
    # the sample is the gallery's first image: its own nearest neighbour, cosine 1
    assert captions[0][0] == "g0.png" and float(captions[0][1]) == pytest.approx(1.0, abs=1e-3), captions
    scores = [float(s) for _, s in captions]
    assert scores == sorted(scores, reverse=True)
    assert 'class="legend"' in dom and "<li><span" in dom  # segmentation legend with class colours
    image = Image.open(tmp_path / "demo.png")
    assert image.size == WINDOW
    for panel in PANELS:
        _crop_is_a_picture(image, panels[panel]["rect"])


def test_demo_on_a_bundle_without_dense_heads_or_gallery(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, bundle)
    with running_server(bundle, tmp_path / "server.log") as server:
        dom = render(f"{server.url}/?example=1", "document.body.dataset.done").dom
    panels = _panels(dom)
    assert panels["reconstruct"]["state"] == "done" and panels["neighbours"]["state"] == "empty"
    assert panels["segment"]["state"] == "off" and panels["detect"]["state"] == "off"
    assert "no gallery" in _note(dom, "neighbours") and "segmentation" in _note(dom, "segment")
