"""A small HTTP/1.1 keep-alive client over asyncio streams, for fedfleet's own hot paths.

Two callers send many small requests to services they know: the population gateway relaying
every device call to a selector (``fedfleet.gateway.relay``), and a device's runtime talking to
its selector (``fedfleet.device.http_transport``: the fleet simulator runs thousands of them in
one process). httpx spent 1-5 ms of CPU per request there (its connection pool and anyio
streams: ``bench/gateway.py``; a py-spy profile of ``bench/up.py`` had three quarters of the
fleet simulator's CPU inside it). This client needs much less: it keeps idle connections per
address (dropped before the server's keep-alive timeout would close them), writes a request in
one buffer and parses the answer with httptools' C parser (the one uvicorn serves with).

What it guarantees:

* **Bounded answers.** An answer that declares more than ``limit`` bytes is refused from its
  headers; one that streams more is refused as the bytes arrive: :class:`AnswerTooLarge`.
* **Bounded time.** Each request has one deadline for connecting, sending and the whole answer.
* **No reuse of a failed connection.** A connection that failed in any way, or whose answer was
  cancelled midway, is closed. A request is sent again (once, on a new connection) only when a
  *reused* idle connection turned out to be closed before any byte of the answer came back: the
  server timed it out while idle, so it never saw the request.
* **Bounded connections.** ``max_connections`` per address; a request waits for a free one at
  most ``queue_timeout`` seconds (``None``: as long as it takes).
* **TLS** with the caller's :class:`ssl.SSLContext` for ``https://`` addresses.

Failures are :class:`HttpError` (a :class:`ConnectionError`): the address could not be
reached, the answer was cut short, malformed, too large, or late.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import httptools

__all__ = ["AnswerTooLarge", "Http11Client", "HttpError", "Response"]

IDLE_SECONDS: Final = 4.0
"""Reuse an idle connection only this long: uvicorn closes keep-alive connections after 5 s."""
MAX_RESPONSE_BYTES: Final = 1024 * 1024 * 1024
"""Default bound on one answer."""

Address = tuple[str, str, int]
"""(scheme, host, port)."""
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
"""Control characters: never in a request line or a header this client writes."""


class HttpError(ConnectionError):
    """The server could not be reached, or its answer was cut short, malformed or late."""


class AnswerTooLarge(HttpError):
    """The answer declared or streamed more bytes than the caller's limit."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    """Lower-case names; the last value wins."""
    body: bytes

    @property
    def status_code(self) -> int:
        return self.status

    @property
    def content(self) -> bytes:
        return self.body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    last_used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.writer.close()


class _Answer:
    """httptools' callbacks: collects one answer. (An exception raised in a callback reaches
    the caller as httptools' own error, so a refusal is recorded in ``error`` instead.)"""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False
        self.keep_alive = False
        self.error: str | None = None
        """Why the answer is refused (it is too large); the parser keeps going harmlessly."""
        self.parser: httptools.HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # Asked here: once the message is complete the parser has reset its state.
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            self.error = f"declares an answer of {declared} bytes (limit {self.limit})"

    def on_body(self, body: bytes) -> None:
        if self.error is None and len(self.body) + len(body) > self.limit:
            self.error = f"an answer over {self.limit} bytes"
        if self.error is None:
            self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class _StaleConnection(HttpError):
    """The connection was closed before any byte of the answer: the request was not taken."""


class Http11Client:
    """Requests to ``http://`` (and, with ``tls``, ``https://``) servers over pooled
    keep-alive connections. Use one per event loop; :meth:`aclose` closes the idle ones."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 3.0,
        idle_seconds: float = IDLE_SECONDS,
        max_connections: int | None = None,
        queue_timeout: float | None = None,
        max_idle_per_address: int = 256,
        max_response: int = MAX_RESPONSE_BYTES,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.idle_seconds = idle_seconds
        self.max_connections = max_connections
        self.queue_timeout = queue_timeout
        self.max_idle = max_idle_per_address
        self.max_response = max_response
        self._default_head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._idle: dict[Address, deque[_Conn]] = defaultdict(deque)
        self._slots: dict[Address, asyncio.Semaphore] = {}

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections (from the event loop's thread)."""
        for pool in self._idle.values():
            while pool:
                pool.pop().close()
        self._idle.clear()

    def _address(self, base_url: str) -> tuple[Address, str]:
        parts = urlsplit(base_url)
        scheme = parts.scheme
        if parts.hostname is None or scheme not in ("http", "https"):
            raise HttpError(f"not an http:// or https:// address: {base_url!r}")
        if scheme == "https" and self.tls is None:
            raise HttpError(f"not a plain http:// address: {base_url!r}")
        default = 443 if scheme == "https" else 80
        return (scheme, parts.hostname, parts.port or default), parts.netloc

    async def request(
        self,
        method: str,
        base_url: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        timeout: float = 30.0,
        limit: int | None = None,
    ) -> Response:
        """One request (``path`` with its query string); :class:`HttpError` when it cannot be
        delivered or answered within ``timeout`` seconds."""
        where, netloc = self._address(base_url)
        fields = [method, path, *(headers or {}), *(headers or {}).values()]
        if " " in method + path or any(_UNSAFE.search(f) for f in fields):
            # A path or a header value with a line break would write a request of its own
            # (a ticket or a checkpoint URL comes from the server's answers).
            raise HttpError(f"refusing to send an unsafe request line or header: {path[:100]!r}")
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
        head = f"{method} {path} HTTP/1.1\r\nhost: {netloc}\r\n{self._default_head}{extra}"
        head += f"content-length: {len(body)}\r\n\r\n"
        try:
            payload = head.encode("latin-1") + body
        except UnicodeEncodeError:
            raise HttpError(f"refusing a header that is not latin-1: {path[:100]!r}") from None
        bound = self.max_response if limit is None else limit
        slots = self._slot(where)
        if slots is not None:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives as the awaited call completes, and a cancelled caller must stop.
            try:
                async with asyncio.timeout(self.queue_timeout):
                    await slots.acquire()
            except TimeoutError:
                raise HttpError(
                    f"no free connection to {where[1]}:{where[2]} in {self.queue_timeout:g} s"
                ) from None
        try:
            return await self._request(where, payload, bound, timeout)
        finally:
            if slots is not None:
                slots.release()

    def _slot(self, where: Address) -> asyncio.Semaphore | None:
        if self.max_connections is None:
            return None
        slots = self._slots.get(where)
        if slots is None:
            slots = self._slots[where] = asyncio.Semaphore(self.max_connections)
        return slots

    async def _request(
        self, where: Address, payload: bytes, limit: int, timeout: float
    ) -> Response:
        deadline = time.monotonic() + timeout
        conn = self._reusable(where)
        if conn is not None:
            try:
                return await self._exchange(conn, where, payload, limit, deadline, timeout)
            except _StaleConnection:
                pass  # closed by the server while idle: nothing was processed, try a new one
        conn = await self._connect(where)
        try:
            return await self._exchange(conn, where, payload, limit, deadline, timeout)
        except _StaleConnection as exc:
            raise HttpError(str(exc)) from None

    def _reusable(self, where: Address) -> _Conn | None:
        pool, now = self._idle.get(where), time.monotonic()
        while pool:
            conn = pool.pop()  # the most recently used: the likeliest to be alive
            if now - conn.last_used < self.idle_seconds and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def _connect(self, where: Address) -> _Conn:
        scheme, host, port = where
        tls = self.tls if scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port, ssl=tls, limit=1 << 20)
        except (OSError, TimeoutError) as exc:
            raise HttpError(f"cannot connect to {host}:{port}: {exc!r}") from None
        return _Conn(reader, writer)

    async def _exchange(
        self,
        conn: _Conn,
        where: Address,
        payload: bytes,
        limit: int,
        deadline: float,
        timeout: float,
    ) -> Response:
        host, port = where[1], where[2]
        answer = _Answer(limit)
        parser = answer.parser = httptools.HttpResponseParser(answer)
        got_any = False
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                conn.writer.write(payload)
                await conn.writer.drain()
                while not answer.done:
                    data = await conn.reader.read(65536)
                    if not data:
                        if not got_any:
                            raise _StaleConnection(f"{host}:{port} closed the connection")
                        raise HttpError(f"{host}:{port} cut its answer short")
                    got_any = True
                    parser.feed_data(data)
                    if answer.error is not None:
                        raise AnswerTooLarge(f"{host}:{port}: {answer.error}")
        except HttpError:
            conn.close()
            raise
        except TimeoutError:
            conn.close()
            raise HttpError(f"no answer from {host}:{port} in {timeout:g} s") from None
        except httptools.HttpParserError as exc:
            conn.close()
            raise HttpError(f"malformed answer from {host}:{port}: {exc}") from None
        except OSError as exc:
            conn.close()
            if not got_any and isinstance(exc, ConnectionResetError | BrokenPipeError):
                raise _StaleConnection(f"{host}:{port}: {exc!r}") from None
            raise HttpError(f"{host}:{port}: {exc!r}") from None
        except BaseException:
            conn.close()  # cancelled mid-answer: the connection's state is unknown
            raise
        if answer.keep_alive and len(self._idle[where]) < self.max_idle:
            conn.last_used = time.monotonic()
            self._idle[where].append(conn)
        else:
            conn.close()
        return Response(parser.get_status_code(), answer.headers, bytes(answer.body))
