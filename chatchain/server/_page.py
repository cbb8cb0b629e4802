"""The chat page: ``GET /`` and its files under ``/static/``, shipped in the package.

The page (``static/index.html``, ``app.js``, ``style.css`` and the vendored libraries in
``static/vendor/``) needs no build step and loads nothing from elsewhere, so it works with no
internet. It signs in with a bearer token and calls the native API like any other client;
serving it needs no token.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC", "install_page", "router"]

STATIC = ("chatchain.server", "static")
"""The package folder the page's files are served from."""

# The page runs only its own scripts and styles and talks only to this origin: even a reply
# that slipped past the Markdown sanitizer could not run a script, load an image (a way to leak
# data) or be framed by another site.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)
_static = StaticFiles(packages=[STATIC])


@router.get("/")
def page() -> FileResponse:
    """The chat page."""
    path, _ = _static.lookup_path("index.html")
    return FileResponse(path, media_type="text/html", headers=_HEADERS)


def install_page(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and its files at ``/static/`` of ``app``.

    Example:
        >>> from fastapi import FastAPI
        >>> app = FastAPI()
        >>> install_page(app)
        >>> from fastapi.testclient import TestClient
        >>> with TestClient(app) as client:
        ...     client.get("/").headers["content-type"], client.get("/static/app.js").status_code
        ('text/html; charset=utf-8', 200)
    """
    app.include_router(router)
    app.mount("/static", _static, name="static")
