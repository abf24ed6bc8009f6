"""The web page at ``/``: static HTML, CSS and JavaScript shipped in the package (``service/static/``).

The page is a client like any other: it lists the models from ``/metrics`` (``bnfold_model_ready``), reads each
model's ``/v2/models/{m}`` metadata and ``…/config``, and sends real V2 inference requests, with the API key the
user types (kept in the page's memory, never in a URL). It cannot load or unload anything. ``BNFOLD_UI=false``
leaves ``/`` and ``/ui/…`` answered 404, as without this module.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

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


def mount(app: FastAPI, settings: Settings) -> None:
    """Add ``GET /`` (the page) and ``/ui/…`` (its files) unless ``BNFOLD_UI`` is false."""
    if not settings.ui:
        return
    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)
