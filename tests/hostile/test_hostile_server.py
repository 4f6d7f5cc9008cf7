"""A hostile server against the device: answers too large to hold are refused while they stream.

The device runtime talks to whatever answers at its configured URL; a compromised or broken
server (or anything on the path) can answer a check-in, a task poll or a checkpoint download
with an endless body. The device's client reads every answer against a bound (1 MiB of JSON;
the checkpoint's own bound) whether the size is declared or only streamed, and gives up with a
:class:`ProtocolError` instead of buffering it. A real uvicorn server on loopback plays the
hostile side.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse

from fedfleet.core.protocol import Assignment, CheckIn
from fedfleet.device.http_transport import MAX_ANSWER_BYTES, ProtocolError, SelectorClient
from tests.uvicorn_thread import serve

MiB = 1024 * 1024


def _hostile() -> FastAPI:
    app = FastAPI()

    async def endless() -> AsyncIterator[bytes]:
        chunk = b"[" + b"0," * (64 * 1024)
        for _ in range(10_000):  # ~1.3 GB if the client kept reading
            yield chunk

    @app.post("/v1/checkin")
    async def checkin() -> StreamingResponse:  # chunked: no size declared
        return StreamingResponse(endless(), media_type="application/json")

    @app.get("/v1/tasks/{round_key}")
    async def task(round_key: str) -> Response:  # declared: refused before the body
        return Response(b"{" + b" " * (2 * MiB) + b"}", media_type="application/json")

    @app.get("/v1/checkpoints/{version}")
    async def checkpoint(version: int) -> StreamingResponse:
        return StreamingResponse(endless(), media_type="application/octet-stream")

    return app


def test_oversized_answers_are_refused_while_they_stream() -> None:
    app = _hostile()

    async def scenario(url: str) -> None:
        async with SelectorClient(url, max_checkpoint_bytes=4 * MiB) as client:
            msg = CheckIn("d-1", "p", True, True, True, 10)
            with pytest.raises(ProtocolError, match="over 1048576 bytes"):
                await client.checkin(msg, "token")
            with pytest.raises(ProtocolError, match="limit 1048576"):
                await client.wait_task(Assignment("a1", "agg", "t"), "d-1")
            with pytest.raises(ProtocolError, match="over 4194304 bytes"):
                await client.checkpoint(1, "d-1", "token")

    with serve(app) as url:
        asyncio.run(scenario(url))
    assert MAX_ANSWER_BYTES == MiB
