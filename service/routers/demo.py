"""GET / : a demo page for people (off with ``CAE_DEMO=false``), and the bundle's optional gallery.

The page (``service/static/demo.*``, plain HTML/JS/CSS, no CDN, no framework) calls the public routes
only: ``/reconstruct`` at an adjustable mask ratio, ``/segment?overlay=true``, ``/detect`` (boxes drawn
on the image) and ``/embed`` for the nearest neighbours of the image among the bundle's gallery. A
gallery is optional: image files in ``BUNDLE/gallery/`` (at most ``MAX_GALLERY`` of them); the page
embeds them with the served model, so the neighbours always match the model that is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, Response

from ..deps import RuntimeDep, require_api_key
from ..errors import NotFound
from ..imaging import sniff_format

STATIC = Path(__file__).resolve().parents[1] / "static"
ASSETS = {"demo.js": "text/javascript", "demo.css": "text/css"}
GALLERY_DIR = "gallery"
GALLERY_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_GALLERY = 64
MAX_GALLERY_FILE_BYTES = 4 * 1024 * 1024

router = APIRouter(include_in_schema=False)


def _demo_on(request: Request) -> None:
    if not request.app.state.settings.demo:
        raise NotFound("the demo page is off (CAE_DEMO=false)", code="not_found")


def _is_image(path: Path) -> bool:
    if path.suffix.lower() not in GALLERY_SUFFIXES or path.is_symlink() or not path.is_file():
        return False
    if path.stat().st_size > MAX_GALLERY_FILE_BYTES:
        return False
    with open(path, "rb") as f:
        return sniff_format(f.read(16)) is not None


def gallery_files(bundle_dir: Path) -> list[Path]:
    """The gallery's image files, by name: regular files (no links) of an accepted format by their bytes,
    at most ``MAX_GALLERY_FILE_BYTES`` each, the first ``MAX_GALLERY`` of them."""
    root = bundle_dir / GALLERY_DIR
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir()) if _is_image(p)][:MAX_GALLERY]


@router.get("/", dependencies=[Depends(_demo_on)])
async def demo_page() -> HTMLResponse:
    return HTMLResponse((STATIC / "demo.html").read_text(), headers={"Cache-Control": "no-cache"})


@router.get("/demo/assets/{name}", dependencies=[Depends(_demo_on)])
async def demo_asset(name: Annotated[str, PathParam()]) -> FileResponse:
    media = ASSETS.get(name)
    if media is None:
        raise NotFound(f"no demo asset {name!r}", code="not_found")
    return FileResponse(STATIC / name, media_type=media, headers={"Cache-Control": "no-cache"})


@router.get("/demo/gallery", dependencies=[Depends(_demo_on), Depends(require_api_key)])
async def gallery(runtime: RuntimeDep) -> dict[str, list[str]]:
    """Names of the bundle's gallery images (empty without a gallery)."""
    runtime.require_ready()
    return {"images": [p.name for p in gallery_files(runtime.settings.model_dir)]}


@router.get("/demo/gallery/{name}", dependencies=[Depends(_demo_on), Depends(require_api_key)])
async def gallery_image(name: Annotated[str, PathParam()], runtime: RuntimeDep) -> Response:
    runtime.require_ready()
    match = {p.name: p for p in gallery_files(runtime.settings.model_dir)}.get(name)
    if match is None:
        raise NotFound(f"no gallery image {name!r}", code="not_found")
    data = match.read_bytes()
    fmt = sniff_format(data)
    if fmt is None:  # replaced since it was listed
        raise NotFound(f"no gallery image {name!r}", code="not_found")
    return Response(data, media_type=f"image/{fmt.lower()}", headers={"Cache-Control": "no-cache"})
