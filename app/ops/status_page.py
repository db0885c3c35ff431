"""The status page: GET /status and its two assets, served from the package.

Plain HTML/CSS/JS in ``app/ops/static`` (package data, no build step). The page
fetches ``/prometheus/metrics/summary`` itself every few seconds and renders
every figure with its provenance, so this router only serves files.
"""

from __future__ import annotations

import html
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

router = APIRouter(tags=["status"])

_ASSETS: dict[str, str] = {
    "status.css": "text/css; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
}


@lru_cache(maxsize=8)
def _read(name: str) -> str:
    return resources.files("app.ops.static").joinpath(name).read_text(encoding="utf-8")


@router.get("/status", response_class=HTMLResponse, include_in_schema=False)
async def status_page(request: Request) -> HTMLResponse:
    """The self-refreshing status page (links honour a proxy's root_path)."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    page = _read("status.html").replace("{{ROOT}}", html.escape(root, quote=True))
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


@router.get("/status/assets/{name}", include_in_schema=False)
async def status_asset(name: str) -> Response:
    """The page's stylesheet and script; nothing else in the package is reachable."""
    content_type = _ASSETS.get(name)
    if content_type is None:
        raise HTTPException(status_code=404, detail="not found")
    return Response(_read(name), media_type=content_type,
                    headers={"Cache-Control": "public, max-age=300"})
