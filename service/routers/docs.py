"""GET /docs (Swagger UI) and /redoc (ReDoc), served offline.

FastAPI's built-in pages load their scripts and styles from a CDN, which air-gapped sites cannot reach.
These pages use the same FastAPI page builders but point at assets the ``fastapi-offline`` package ships
(Swagger UI 5 and ReDoc 2 bundles, in the ``serve`` extra), served here from the installed package: no
CDN, no Google fonts, no copy of the bundles in this repository.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from ..errors import NotFound

ASSETS_PREFIX = "/docs/assets"
# name -> media type: the only files served (no directory listing, no path traversal)
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
SWAGGER_PARAMETERS = {"validatorUrl": None}  # Swagger UI's default validator badge calls an external host

router = APIRouter(include_in_schema=False)


def assets_dir() -> Path:
    """The installed ``fastapi_offline`` package's static folder."""
    return Path(str(files("fastapi_offline") / "static"))


def _urls(request: Request) -> tuple[str, str]:
    """(OpenAPI URL, assets URL prefix), honouring a root path (behind a proxy)."""
    root = request.scope.get("root_path", "").rstrip("/")
    return root + (request.app.openapi_url or "/openapi.json"), root + ASSETS_PREFIX


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    openapi, assets = _urls(request)
    return get_swagger_ui_html(
        openapi_url=openapi,
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon.png",
        oauth2_redirect_url=request.app.swagger_ui_oauth2_redirect_url,
        swagger_ui_parameters={**(request.app.swagger_ui_parameters or {}), **SWAGGER_PARAMETERS},
    )


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    openapi, assets = _urls(request)
    return get_redoc_html(
        openapi_url=openapi,
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{assets}/redoc.standalone.js",
        redoc_favicon_url=f"{assets}/favicon.png",
        with_google_fonts=False,
    )


@router.get(ASSETS_PREFIX + "/{name}")
async def asset(name: Annotated[str, PathParam()]) -> FileResponse:
    media = ASSETS.get(name)
    if media is None:
        raise NotFound(f"no documentation asset {name!r}", code="not_found")
    return FileResponse(
        assets_dir() / name, media_type=media, headers={"Cache-Control": "public, max-age=86400"}
    )
