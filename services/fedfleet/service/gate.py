"""The front door of every service: authenticate and bound a request before its body is read.

FastAPI reads and validates a request body before any dependency or endpoint code runs, so a
credential check written in an endpoint comes after the expensive part: a 2 MB JSON check-in
without a token used to be parsed in full, and a chunked report was buffered whole before its
size was compared with the limit. :class:`Gate` is a pure ASGI middleware in front of the app
that settles what can be settled from the request line and the headers alone:

* each request is matched to a :class:`Door` (method and path pattern); a request no door
  matches may carry no body at all;
* the door's credential check (a device token, a report ticket, the internal token) runs on
  the headers and path: a request that fails it is refused (401/403) and its body never read;
* a declared ``Content-Length`` over the door's limit is refused (413) at once, and the bytes
  of every body are counted as they stream in — chunked ones too — so a body that passes the
  limit fails with 413 the moment it does, holding at most one chunk more than the limit;
* headers are bounded in count and total size (431).

Refusals are short JSON documents that never echo the request, and they close the connection,
so the rest of a refused body is not parsed. :func:`install` also replaces FastAPI's 422
handler, whose default body repeats the whole invalid input, with one that names the fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "MAX_ERROR_DETAIL",
    "BodyTooLarge",
    "Door",
    "Gate",
    "GateLimits",
    "Refusal",
    "Seen",
    "bearer",
    "install",
]

MAX_ERROR_DETAIL = 200
"""Longest ``detail`` text (characters) an error body carries; longer ones are cut."""


@dataclass(frozen=True, slots=True)
class GateLimits:
    """Bounds every request meets before any route sees it."""

    max_headers: int = 64
    """Most header lines per request: fedfleet's own clients send fewer than ten, browsers and
    proxies about twenty."""
    max_header_bytes: int = 16 * 1024
    """Most bytes of header names and values together (nginx's default buffers hold 8-32 KiB)."""
    default_body_limit: int = 0
    """Body bytes allowed on a request no door matches: none (those routes are all GETs)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused before its body is read."""

    status: int
    detail: str
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Seen:
    """What a door's check may look at: headers (lower-case names, first value wins), the
    path pattern's named groups and the query parameters (first value wins)."""

    headers: Mapping[str, str]
    path: Mapping[str, str]
    query: Mapping[str, str]


Check = Callable[[Seen], Refusal | None]
"""A credential check on the headers alone: ``None`` lets the request in."""


@dataclass(frozen=True, slots=True)
class Door:
    """One route's bounds: the largest body it takes and the credential it needs."""

    method: str
    path: re.Pattern[str]
    limit: int
    """Most body bytes (the declared length and the bytes actually streamed)."""
    check: Check | None = None


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes its door's limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body exceeds {limit} bytes", {"connection": "close"})


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_DETAIL else text[: MAX_ERROR_DETAIL - 3] + "..."


async def _refuse(send: Send, status: int, detail: str, headers: Mapping[str, str]) -> None:
    body = json.dumps({"detail": _short(detail)}).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: match a :class:`Door`, check it, bound the body (see module doc)."""

    def __init__(
        self, app: ASGIApp, *, doors: Sequence[Door], limits: GateLimits | None = None
    ) -> None:
        self.app = app
        self.doors = tuple(doors)
        self.limits = limits or GateLimits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        limits = self.limits
        if len(raw_headers) > limits.max_headers or (
            sum(len(k) + len(v) for k, v in raw_headers) > limits.max_header_bytes
        ):
            await _refuse(send, 431, "request headers too large", {})
            return
        headers: dict[str, str] = {}
        for k, v in raw_headers:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        door, groups = self._match(scope["method"], scope["path"])
        limit = door.limit if door is not None else limits.default_body_limit
        if door is not None and door.check is not None:
            query = {
                k: v[0]
                for k, v in parse_qs(
                    scope.get("query_string", b"").decode("latin-1"), max_num_fields=32
                ).items()
            }
            refusal = door.check(Seen(headers, groups, query))
            if refusal is not None:
                await _refuse(send, refusal.status, refusal.detail, refusal.headers or {})
                return
        if limit == 0 and "transfer-encoding" in headers:
            await _refuse(send, 413, "this route takes no body", {})
            return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit() or len(declared) > 18:
                await _refuse(send, 400, "bad content-length", {})
                return
            if int(declared) > limit:
                await _refuse(send, 413, f"body exceeds {limit} bytes", {})
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)

    def _match(self, method: str, path: str) -> tuple[Door | None, dict[str, str]]:
        for door in self.doors:
            if door.method == method:
                m = door.path.fullmatch(path)
                if m is not None:
                    return door, m.groupdict()
        return None, {}


def _loc(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 naming at most five fields and what is wrong with each, never their values."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": _short(_loc(e.get("loc", ()))), "msg": _short(str(e.get("msg", "invalid")))}
        for e in exc.errors()[:5]
    ]
    return JSONResponse({"detail": errors}, status_code=422)


def install(app: FastAPI, doors: Sequence[Door], limits: GateLimits | None = None) -> None:
    """Put a :class:`Gate` in front of ``app`` and its short 422 handler behind it."""
    app.add_middleware(Gate, doors=doors, limits=limits)
    app.add_exception_handler(RequestValidationError, _validation_error)


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
