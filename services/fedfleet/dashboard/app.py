"""The dashboard's web app: one static page and a small read-only JSON API over the store.

The page (``static/``: plain HTML, JS and CSS shipped as package data, no build step, no CDN)
polls ``/api/jobs`` and ``/api/job`` every few seconds and draws its plots as inline SVG. Polling
rather than server-sent events: each answer is small and incremental (attempts from the index
the page already has), it survives proxies and restarts without reconnection logic, and the
server holds no open streams, so it shuts down at once.

Safety, since job names come from users and the page may be opened on a shared machine:

- **read-only**: only GET routes, and the app sees the store only through
  :class:`~fedfleet.dashboard.views.JobReader`;
- **escaped**: the page builds every node with ``textContent``/``setAttribute``, never HTML
  from data, and a strict Content-Security-Policy (scripts and styles from this origin only,
  no inline code) makes a slip there inert;
- **no secrets**: the store is named by :func:`~fedfleet.dashboard.views.redact_store_url`,
  and store errors are reported as "unavailable" with the host, never the URL;
- **loopback by default**, and when bound to loopback the ``Host`` header must be a loopback
  name, so a web page elsewhere cannot read the API through DNS rebinding.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware

from fedfleet.dashboard.views import JobReader, job_detail, list_jobs
from fedfleet.store.base import StoreUnavailable

__all__ = ["LOOPBACK_HOSTS", "create_app"]

log = logging.getLogger("fedfleet.dashboard")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
"""Host header values accepted when the dashboard listens on loopback."""

_STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _asset(name: str) -> bytes:
    return (resources.files("fedfleet.dashboard") / "static" / name).read_bytes()


def create_app(
    reader: JobReader,
    *,
    store_label: str = "",
    interval: float = 2.0,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """The dashboard over ``reader``; ``allowed_hosts`` limits the Host header (None: any)."""
    app = FastAPI(title="fedfleet dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    pages = {name: _asset(name) for name in ("index.html", *_STATIC)}

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for header, value in _HEADERS.items():
            response.headers.setdefault(header, value)
        return response

    def unavailable(exc: StoreUnavailable) -> Response:
        log.warning("store unavailable", extra={"error": str(exc)})
        return JSONResponse(
            {"error": "store unavailable"}, status_code=503, headers={"Retry-After": "2"}
        )

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(pages["index.html"], media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:  # a fixed set of files: no path ever reaches the filesystem
            return JSONResponse({"error": "not found"}, status_code=404)
        return Response(pages[name], media_type=_STATIC[name])

    @app.get("/api/config")
    def config() -> dict[str, Any]:
        return {"store": store_label, "interval": interval}

    @app.get("/api/jobs", response_model=None)
    def jobs() -> dict[str, Any] | Response:
        try:
            return {"jobs": list_jobs(reader)}
        except StoreUnavailable as exc:
            return unavailable(exc)

    @app.get("/api/job", response_model=None)
    def job(
        key: str = Query(min_length=1, max_length=253),
        start: int = Query(0, ge=0, le=10**9),
    ) -> dict[str, Any] | Response:
        try:
            detail = job_detail(reader, key, start)
        except StoreUnavailable as exc:
            return unavailable(exc)
        except ValueError:  # a key the store refuses (braces): no such job
            detail = None
        if detail is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        return detail

    return app
