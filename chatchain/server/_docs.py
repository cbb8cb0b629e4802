"""The API's documentation page, ``GET /docs``: Swagger UI from files shipped in packages.

FastAPI's own ``/docs`` loads Swagger UI from a CDN, with no integrity hashes and no
Content-Security-Policy, on the origin where the chat page keeps its bearer token in
``sessionStorage``; offline it is blank. This page instead loads Swagger UI from the copy that
``fastapi-offline`` ships (a dependency of the ``server`` extra; only its files are used) and
starts it with ``static/docs.js`` of this package, under a strict policy: scripts, styles and
requests of this origin only, no inline script, no framing. URLs are relative, so the page
also works behind a reverse proxy that serves the app under a path prefix.
"""

from __future__ import annotations

from importlib.util import find_spec

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from chatchain.errors import ConfigurationError
from chatchain.server._page import STATIC

__all__ = ["install_docs"]

SWAGGER_UI = ("fastapi_offline", "static")
"""The package folder Swagger UI's files are served from (``swagger-ui-bundle.js``, ...)."""

# Swagger UI renders with React (styles set from script, which style-src allows) and asks
# only for /openapi.json; validatorUrl is off in docs.js, so nothing goes to swagger.io.
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


@router.get("/docs")
def docs() -> FileResponse:
    """The API's documentation (Swagger UI)."""
    path, _ = StaticFiles(packages=[STATIC]).lookup_path("docs.html")
    return FileResponse(path, media_type="text/html", headers=_HEADERS)


def install_docs(app: FastAPI) -> None:
    """Serve the documentation at ``/docs`` of ``app``, and Swagger UI at ``/docs/assets/``.

    Build ``app`` with ``docs_url=None, redoc_url=None``: FastAPI's own pages load from a CDN.

    Raises:
        ConfigurationError: ``fastapi-offline`` (which ships Swagger UI) is not installed.

    Example:
        >>> app = FastAPI(docs_url=None, redoc_url=None)
        >>> install_docs(app)
        >>> from fastapi.testclient import TestClient
        >>> with TestClient(app) as client:
        ...     page = client.get("/docs")
        ...     bundle = client.get("/docs/assets/swagger-ui-bundle.js")
        >>> page.headers["content-security-policy"].split("; ")[1], bundle.status_code
        ("script-src 'self'", 200)
    """
    if find_spec(SWAGGER_UI[0]) is None:
        raise ConfigurationError(
            "The API docs need Swagger UI's files from fastapi-offline, which is not installed: "
            "pip install 'chatchain[server]'."
        )
    app.include_router(router)
    app.mount("/docs/assets", StaticFiles(packages=[SWAGGER_UI]), name="docs-assets")
