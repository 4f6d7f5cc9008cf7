"""The uvicorn server every fedfleet service runs on, with the limits uvicorn lacks.

uvicorn bounds neither the number nor the size of request headers on its default (httptools)
protocol, and a connection that sends nothing, or sends its headers or body a byte at a time,
is never timed out: its keep-alive timer only starts after a response. One such client per
file descriptor can exhaust a selector. :class:`GuardedProtocol` is uvicorn's httptools
protocol with those bounds added:

* the request line and headers must arrive within ``header_timeout`` of the connection (or of
  the request's first byte on a kept-alive connection), or the connection is closed;
* a body must keep moving: ``body_idle_timeout`` without a byte closes it (time the server
  itself holds reading paused, because the app has not consumed what it has, does not count);
* a URL over ``max_url_bytes`` is answered 414, more than ``max_headers`` header lines or more
  than ``max_header_bytes`` of them 431, and the connection is closed;
* at most ``max_connections`` connections and requests at once (uvicorn answers 503 beyond).

:func:`server_config` builds the ``uvicorn.Config`` that ``fedfleet selector|aggregator|
coordinator`` serve with; the integration and hostile test tiers use the same one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["GuardedProtocol", "ServerLimits", "run_server", "server_config"]


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Connection-level bounds of a service (seconds, bytes, counts)."""

    header_timeout: float = 10.0
    """Seconds from a connection's (or a request's) first byte until its headers are complete;
    a phone on a slow network sends a few hundred bytes of headers in well under a second."""
    body_idle_timeout: float = 30.0
    """Seconds a request body may stall without a byte arriving."""
    keep_alive: int = 5
    """Seconds an idle kept-alive connection stays open between requests (uvicorn's default)."""
    max_url_bytes: int = 8 * 1024
    """Longest request target (path and query) in bytes."""
    max_headers: int = 64
    """Most header lines in one request (fedfleet's clients send fewer than ten)."""
    max_header_bytes: int = 16 * 1024
    """Most bytes of header names and values in one request."""
    max_connections: int = 4096
    """Concurrent connections (and requests) before uvicorn answers 503; held long-polls of
    selected devices count, so leave room for a round's selections."""


class _Refused(Exception):
    """Raised from a parser callback; :meth:`GuardedProtocol.send_400_response` answers it."""

    def __init__(self, status: bytes) -> None:
        super().__init__(status.decode())
        self.status = status


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header, URL and time limits (see module doc)."""

    limits = ServerLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._url_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        self._refusal: bytes | None = None
        self._in_body = False

    @classmethod
    def with_limits(cls, limits: ServerLimits) -> type[GuardedProtocol]:
        """A subclass bound to ``limits`` (uvicorn instantiates the protocol class itself)."""
        return type("GuardedProtocol", (cls,), {"limits": limits})

    # -- timers ----------------------------------------------------------------------------------
    def _arm(self, seconds: float, body: bool) -> None:
        self._disarm()
        self._in_body = body
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._in_body and self.flow is not None and self.flow.read_paused:
            # The app has not read what arrived yet: the client is not the one stalling.
            self._arm(self.limits.body_idle_timeout, body=True)
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout, body=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- parser callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._url_bytes = self._header_count = self._header_bytes = 0
        self._arm(self.limits.header_timeout, body=False)

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self.limits.max_url_bytes:
            self._refusal = b"414 URI Too Long"
            raise _Refused(self._refusal)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if (
            self._header_count > self.limits.max_headers
            or self._header_bytes > self.limits.max_header_bytes
        ):
            self._refusal = b"431 Request Header Fields Too Large"
            raise _Refused(self._refusal)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._arm(self.limits.body_idle_timeout, body=True)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._arm(self.limits.body_idle_timeout, body=True)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
            return
        self._disarm()
        body = b'{"detail":"' + self._refusal[4:].lower() + b'"}'
        self.transport.write(
            b"HTTP/1.1 "
            + self._refusal
            + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\nconnection: close\r\n\r\n"
            + body
        )
        self.transport.close()


def server_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: ServerLimits | None = None,
    **overrides: Any,
) -> uvicorn.Config:
    """The ``uvicorn.Config`` of a fedfleet service: :class:`GuardedProtocol` and ``limits``
    (serve it on a socket of your own with ``uvicorn.Server(config).run(sockets=[sock])``)."""
    limits = limits or ServerLimits()
    options: dict[str, Any] = {
        "http": GuardedProtocol.with_limits(limits),
        "timeout_keep_alive": limits.keep_alive,
        "limit_concurrency": limits.max_connections,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
        "host": host,
        "port": port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
        # No service speaks WebSocket: none is served (and the protocol's modules not loaded).
        "ws": "none",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def run_server(app: Any, *, host: str, port: int, max_connections: int, **overrides: Any) -> None:
    """Serve ``app`` with :func:`server_config` until SIGTERM/SIGINT (graceful shutdown): what
    ``fedfleet selector|aggregator|coordinator`` and ``fedfleet population gateway`` run."""
    config = server_config(
        app,
        host=host,
        port=port,
        limits=ServerLimits(max_connections=max_connections),
        **overrides,
    )
    uvicorn.Server(config).run()
