"""The gateway's hop to a job's selector: HTTP/1.1 keep-alive over asyncio streams.

Every device call through the gateway is one request to a selector on the cluster network, so
the hop's cost is the gateway's cost: measured with ``bench/gateway.py``, httpx spent about
3-5 ms of CPU per relayed check-in (its connection pool and anyio streams), six times what
the selector itself spends answering it. The relay needs much less: requests to known
services, small bodies, one response each. It keeps idle connections per address (dropped
before the server's keep-alive timeout would close them), writes the request in one buffer
and parses the response with httptools' C parser (the one uvicorn serves with), bounding its
size. A connection that fails is closed, never reused; a request is sent again (once, on a
new connection) only when a *reused* connection turned out to be closed before any byte of the
answer came back: the selector timed the idle connection out. Even a request the selector did
take would be harmless to repeat here: a device's check-in selects it once, and its second
report for a round is refused.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import httptools

__all__ = ["Relay", "RelayError", "RelayResponse"]

IDLE_SECONDS: Final = 4.0
"""Reuse an idle connection only this long: uvicorn closes keep-alive connections after 5 s."""
MAX_RESPONSE_BYTES: Final = 1024 * 1024 * 1024
"""Bound on one relayed answer (a checkpoint is the largest)."""


class RelayError(ConnectionError):
    """The selector could not be reached, or its answer was cut short or malformed."""


@dataclass(slots=True)
class RelayResponse:
    status: int
    headers: dict[str, str]
    """Lower-case names; the last value wins."""
    body: bytes

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
    """httptools' callbacks: collects one response. (An exception raised in a callback reaches
    the caller as httptools' own error, so a refusal is recorded in ``error`` instead.)"""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False
        self.keep_alive = False
        self.error: str | None = None
        self.parser: httptools.HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # Asked here: once the message is complete the parser has reset its state.
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.error is None and len(self.body) + len(body) > self.limit:
            self.error = f"answer over {self.limit} bytes"
        if self.error is None:
            self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class Relay:
    """Requests to selectors (``http://host:port``) over pooled keep-alive connections."""

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        idle_seconds: float = IDLE_SECONDS,
        max_idle_per_address: int = 256,
        max_response: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle_per_address
        self.max_response = max_response
        self._idle: dict[tuple[str, int], deque[_Conn]] = defaultdict(deque)

    async def aclose(self) -> None:
        for pool in self._idle.values():
            while pool:
                pool.pop().close()
        self._idle.clear()

    def _reusable(self, where: tuple[str, int]) -> _Conn | None:
        pool, now = self._idle[where], time.monotonic()
        while pool:
            conn = pool.pop()  # the most recently used: the likeliest to be alive
            if now - conn.last_used < self.idle_seconds and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def _connect(self, where: tuple[str, int]) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*where), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise RelayError(f"cannot connect to {where[0]}:{where[1]}: {exc!r}") from None
        return _Conn(reader, writer)

    async def request(
        self,
        method: str,
        base_url: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        timeout: float = 30.0,
    ) -> RelayResponse:
        """One request; :class:`RelayError` when it cannot be delivered or answered."""
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise RelayError(f"not a plain http:// address: {base_url!r}")
        where = (parts.hostname, parts.port or 80)
        head = [f"{method} {path} HTTP/1.1", f"host: {parts.netloc}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head.append(f"content-length: {len(body)}")
        payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        conn = self._reusable(where)
        if conn is not None:
            try:
                return await self._exchange(conn, where, payload, timeout)
            except _StaleConnection:
                pass  # closed by the server while idle: nothing was processed, try a new one
        conn = await self._connect(where)
        try:
            return await self._exchange(conn, where, payload, timeout)
        except _StaleConnection as exc:
            raise RelayError(str(exc)) from None

    async def _exchange(
        self, conn: _Conn, where: tuple[str, int], payload: bytes, timeout: float
    ) -> RelayResponse:
        answer = _Answer(self.max_response)
        parser = answer.parser = httptools.HttpResponseParser(answer)
        got_any = False
        deadline = time.monotonic() + timeout
        try:
            conn.writer.write(payload)
            await conn.writer.drain()
            while not answer.done:
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError
                    data = await asyncio.wait_for(conn.reader.read(65536), left)
                except TimeoutError:
                    raise RelayError(
                        f"no answer from {where[0]}:{where[1]} in {timeout:g} s"
                    ) from None
                if not data:
                    if not got_any:
                        raise _StaleConnection(f"{where[0]}:{where[1]} closed the connection")
                    raise RelayError(f"{where[0]}:{where[1]} cut its answer short")
                got_any = True
                parser.feed_data(data)
                if answer.error is not None:
                    raise RelayError(f"{where[0]}:{where[1]}: {answer.error}")
        except (_StaleConnection, RelayError):
            conn.close()
            raise
        except httptools.HttpParserError as exc:
            conn.close()
            raise RelayError(f"malformed answer from {where[0]}:{where[1]}: {exc}") from None
        except (OSError, TimeoutError) as exc:
            conn.close()
            if not got_any and isinstance(exc, ConnectionResetError | BrokenPipeError):
                raise _StaleConnection(f"{where[0]}:{where[1]}: {exc!r}") from None
            raise RelayError(f"{where[0]}:{where[1]}: {exc!r}") from None
        except BaseException:
            conn.close()  # cancelled mid-answer: the connection's state is unknown
            raise
        if answer.keep_alive and len(self._idle[where]) < self.max_idle:
            conn.last_used = time.monotonic()
            self._idle[where].append(conn)
        else:
            conn.close()
        return RelayResponse(parser.get_status_code(), answer.headers, bytes(answer.body))


class _StaleConnection(RelayError):
    """The connection was closed before any byte of the answer: the request was not taken."""
