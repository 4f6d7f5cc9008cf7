"""The gateway's relay (``fedfleet.gateway.relay``) against real servers on loopback.

A real uvicorn server (the services' own configuration) for what a selector does: answers
with a length, chunked answers, keep-alive; and small asyncio TCP servers for what a broken or
dying one does: close an idle kept-alive connection, cut an answer short, answer garbage,
answer too much, never answer. Each must end in a :class:`RelayError` or a correct answer,
never a hang, and a connection that failed is never used again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from fedfleet.gateway.relay import Relay, RelayError
from fedfleet.redis_server import free_port
from tests.uvicorn_thread import serve


def _selector_like() -> tuple[FastAPI, list[str]]:
    app = FastAPI()
    peers: list[str] = []

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        client = request.client
        peers.append(f"{client.host}:{client.port}" if client else "?")
        body = await request.body()
        return Response(
            body,
            media_type="application/octet-stream",
            headers={"x-seen-device": request.headers.get("x-fedfleet-device", "")},
        )

    @app.get("/chunked")
    async def chunked() -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"part{i};".encode()

        return StreamingResponse(parts(), media_type="text/plain")

    return app, peers


def test_answers_keep_alive_and_chunked_bodies_through_a_real_server() -> None:
    app, peers = _selector_like()

    async def scenario(url: str) -> None:
        relay = Relay()
        try:
            for i in range(5):
                r = await relay.request(
                    "POST",
                    url,
                    "/echo",
                    headers={"x-fedfleet-device": f"d-{i}", "content-type": "text/plain"},
                    body=b"x" * (i * 1000),
                )
                assert r.status == 200 and r.body == b"x" * (i * 1000)
                assert r.headers["x-seen-device"] == f"d-{i}"
            r = await relay.request("GET", url, "/chunked")
            assert r.status == 200 and r.body == b"part0;part1;part2;part3;part4;"
            r = await relay.request("GET", url, "/nowhere")
            assert r.status == 404 and r.json() == {"detail": "Not Found"}
        finally:
            await relay.aclose()

    with serve(app) as url:
        asyncio.run(scenario(url))
    assert len(peers) == 5 and len(set(peers)) == 1, peers  # one kept-alive connection


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _raw_server(handler: Handler) -> tuple[asyncio.Server, str]:
    port = free_port("127.0.0.1")
    server = await asyncio.start_server(handler, "127.0.0.1", port)
    return server, f"http://127.0.0.1:{port}"


async def _read_request(reader: asyncio.StreamReader) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if length:
        await reader.readexactly(length)
    return True


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"


def test_an_idle_connection_the_server_closed_is_replaced_once() -> None:
    accepted = 0

    async def once_per_connection(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await _read_request(reader)
        w.write(OK)  # keep-alive by HTTP/1.1's default, then closed anyway: a timed-out idle
        await w.drain()
        w.close()

    async def scenario() -> None:
        server, url = await _raw_server(once_per_connection)
        relay = Relay()
        try:
            for _ in range(3):
                r = await relay.request("GET", url, "/")
                assert r.status == 200 and r.body == b"ok"
                await asyncio.sleep(0.05)  # let the close arrive
        finally:
            await relay.aclose()
            server.close()

    asyncio.run(scenario())
    assert accepted == 3


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "cut its answer short"),
        (b"NOT HTTP AT ALL\r\n\r\n", "malformed answer"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"y" * 5000, "limit 1000"),
        (b"", "closed the connection"),
    ],
)
def test_broken_answers_are_errors_and_their_connection_is_dropped(
    answer: bytes, match: str
) -> None:
    async def broken(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        w.write(answer)
        await w.drain()
        w.close()

    async def scenario() -> None:
        server, url = await _raw_server(broken)
        relay = Relay(max_response=1000)
        try:
            with pytest.raises(RelayError, match=match):
                await relay.request("GET", url, "/")
            assert not any(relay._idle.values())  # nothing kept for reuse
        finally:
            await relay.aclose()
            server.close()

    asyncio.run(scenario())


def test_silence_and_no_listener_are_errors_not_hangs() -> None:
    async def silent(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(30)

    async def scenario() -> None:
        server, url = await _raw_server(silent)
        relay = Relay()
        try:
            with pytest.raises(RelayError, match="no answer"):
                await relay.request("GET", url, "/", timeout=0.5)
            nobody = f"http://127.0.0.1:{free_port('127.0.0.1')}"
            with pytest.raises(RelayError, match="cannot connect"):
                await relay.request("GET", nobody, "/")
            with pytest.raises(RelayError, match="plain http"):
                await relay.request("GET", "https://127.0.0.1:1", "/")
        finally:
            await relay.aclose()
            server.close()

    asyncio.run(scenario())


def test_a_line_break_or_a_control_character_in_a_request_is_refused_before_sending() -> None:
    """A ticket or a checkpoint URL comes from the server's answers: a value with a line break
    would write a second request (or header) of the caller's choosing. Nothing is sent."""
    accepted = 0

    async def counting(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await _read_request(reader)
        w.write(OK)
        await w.drain()

    async def scenario() -> None:
        server, url = await _raw_server(counting)
        relay = Relay()
        try:
            bad_headers = [
                {"x-fedfleet-ticket": "t\r\nx-injected: 1"},
                {"x-fedfleet-ticket": "t\x00"},
                {"x-bad\nname": "v"},
                {"x-fedfleet-device": "d\u20ac"},  # not latin-1
            ]
            for headers in bad_headers:
                with pytest.raises(RelayError, match="refusing"):
                    await relay.request("GET", url, "/", headers=headers)
            for path in ("/a HTTP/1.1\r\nhost: x\r\n\r\nGET /b", "/a b", "/a\tb"):
                with pytest.raises(RelayError, match="refusing"):
                    await relay.request("GET", url, path)
            r = await relay.request("GET", url, "/fine", headers={"x-fedfleet-ticket": "t"})
            assert r.status == 200
        finally:
            await relay.aclose()
            server.close()

    asyncio.run(scenario())
    assert accepted == 1  # only the well-formed request reached the server
