"""The chat service: ``chatchain serve``, an HTTP API over a `Chatbot` (``chatchain[server]``).

`create_app` builds the FastAPI app: users authenticate with bearer tokens (`Users`), each
sees only their own sessions, turns answer as JSON or as server-sent events, errors map to
HTTP statuses with one JSON shape, and ``/healthz`` and ``/metrics`` serve operators. Several
worker processes (``--workers N``) share the store, so sessions, locks, users and budgets hold
across them.

Adding routes: a router's handlers take ``user: Caller`` (the authenticated caller, 401
otherwise) and ``service: ServiceDep`` (the Chatbot, users and throttle) from
``chatchain.server._service``; a user's session lives in the store under
``session_key(user, session_id)``; raising a chatchain error answers with its status.
"""

from __future__ import annotations

try:
    from chatchain.server._app import create_app
except ImportError as exc:  # pragma: no cover - depends on what is installed
    package = (exc.name or "").split(".")[0]
    if package in {"fastapi", "starlette", "sse_starlette", "prometheus_client", "limits"}:
        from chatchain.errors import ConfigurationError

        raise ConfigurationError(
            f"The chat service needs {package}: install it with pip install 'chatchain[server]'."
        ) from exc
    raise

__all__ = ["create_app"]
