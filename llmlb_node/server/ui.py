"""The operator's page: ``GET /`` and its ``/ui/...`` assets, static files shipped in the package.

Plain HTML, CSS and JavaScript (no build step, nothing fetched from elsewhere); the page reads the
node's JSON routes with the key the operator types in, so it opens without auth and holds no data.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response

UI_DIR = Path(__file__).resolve().parent / "ui"
PUBLIC_PATHS = ("/", "/ui/")
"""Paths BearerAuth lets through without a key: the page and its assets (exact, and a prefix)."""
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page's security headers: no script, style or connection from any other origin.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_public(path: str) -> bool:
    """True for the page and its assets, the only paths served without the API key."""
    return path == PUBLIC_PATHS[0] or path.startswith(PUBLIC_PATHS[1])


def assets() -> dict[str, Path]:
    """The files under ``/ui/``: every file of the ui directory, by name (no subdirectories)."""
    return {p.name: p for p in UI_DIR.iterdir() if p.is_file() and p.suffix in _TYPES}


async def page(request: Request) -> Response:
    """``GET /``: the page."""
    return _file(UI_DIR / "index.html")


async def asset(request: Request) -> Response:
    """``GET /ui/{name}``: one of the page's files; any other name is 404 (no path walking)."""
    found = assets().get(request.path_params["name"])
    if found is None:
        raise HTTPException(404, f"no such file of the page: {request.url.path}")
    return _file(found)


def _file(path: Path) -> Response:
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)
