"""Routes for operators: ``GET /healthz`` and ``GET /metrics`` (no token needed)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from chatchain.server import _metrics
from chatchain.server._errors import error_body
from chatchain.server._service import ServiceDep, app_state

__all__ = ["router"]

router = APIRouter(tags=["operations"])

_PROBE = "healthz:probe"  # a session id no user can have (user names hold no ':')


@router.get("/healthz")
async def healthz(service: ServiceDep, request: Request) -> JSONResponse:
    """200 ``{"status": "ok"}`` when the store answers, else 503 with the store's error; 503
    ``{"status": "draining"}`` once the instance is shutting down (SIGTERM), so that a load
    balancer takes it out while it finishes its turns."""
    if app_state(request)["drain"].draining:
        body = error_body(
            "Draining",
            "This instance is shutting down: it finishes its turns in flight and takes no "
            "new ones soon. Send requests to another instance.",
        )
        return JSONResponse({"status": "draining", **body}, status_code=503)
    try:
        await asyncio.to_thread(service.bot.store.count, _PROBE)
    except Exception as exc:
        body = error_body(
            "StoreError", f"The store does not answer ({type(exc).__name__}): check it is up."
        )
        return JSONResponse({"status": "unavailable", **body}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
def metrics() -> Response:
    """The service's metrics in Prometheus' text format (all workers' with several)."""
    body, content_type = _metrics.exposition()
    return Response(body, media_type=content_type)
