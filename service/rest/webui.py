"""The web page at ``/``: static HTML, CSS and JavaScript shipped in the package (``service/rest/static/``), read
into memory once at start-up.

The page is a client like any other: it lists the models from ``/metrics`` (``bnfold_model_ready``), reads each
model's ``/v2/models/{m}`` metadata and ``…/config``, and sends real V2 inference requests, with the API key the
user types (kept in the page's memory, never in a URL). It cannot load or unload anything. ``BNFOLD_UI=false``
leaves ``/`` and ``/ui/…`` answered 404, as without this module.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from service.settings import Settings

STATIC = Path(__file__).parent / "static"

#: The page loads nothing but its own files and talks only to this server.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
}


class PageFile:
    """One file of the page, held in memory: its bytes, media type and ETag."""

    def __init__(self, path: Path) -> None:
        self.body = path.read_bytes()
        self.media_type = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        self.etag = f'"{hashlib.sha256(self.body).hexdigest()[:32]}"'

    def response(self, request: Request) -> Response:
        headers = {**HEADERS, "ETag": self.etag}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def read_page(folder: Path | None = None) -> dict[str, PageFile]:
    """Every file of the page, read now: served from memory, so reinstalling bnfold under a running server (which
    replaces or removes these files) cannot break the page."""
    folder = folder or STATIC
    return {p.name: PageFile(p) for p in sorted(folder.iterdir()) if p.is_file()}


def mount(app: FastAPI, settings: Settings) -> None:
    """Add ``GET /`` (the page) and ``/ui/…`` (its files) unless ``BNFOLD_UI`` is false; the files are read here,
    once, at start-up."""
    if not settings.ui:
        return
    files = read_page()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index(request: Request) -> Response:
        return files["index.html"].response(request)

    @app.api_route("/ui/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def page_file(request: Request, name: str) -> Response:
        found = files.get(name)
        if found is None:
            raise HTTPException(404)
        return found.response(request)
