"""Unit tests of the device's enrollment calls: the requests match the enrollment design, and
an answer that is not exactly a usable identity for this population is refused (nothing of it
would be stored). The server is an httpx MockTransport: only the client's logic is tested."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from fedfleet.device.enroll_client import EnrollmentClient
from fedfleet.device.http_transport import Refused, ServerBusy
from fedfleet.device.state import Identity

pytestmark = pytest.mark.unit

DEVICE = "d-" + "ab" * 12


def _answer(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id": DEVICE,
        "population": "pop",
        "credential": "v1.cGF5bG9hZA.c2ln",
        "issued_at": 100.0,
        "expires_at": 200.0,
        "renew_after": 150.0,
    }
    body.update(changes)
    return body


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> EnrollmentClient:
    return EnrollmentClient("http://selector:8080/", transport=httpx.MockTransport(handler))


def _enroll(handler: Callable[[httpx.Request], httpx.Response]) -> Identity:
    async def go() -> Identity:
        client = _client(handler)
        try:
            return await client.enroll("pop", "tok")
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_enroll_request_and_answer_follow_the_design() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json=_answer())

    identity = _enroll(handler)
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/v1/enroll")
    assert request.headers["authorization"] == "Bearer tok"
    assert json.loads(request.content) == {"population": "pop"}
    assert identity == Identity.from_dict({**_answer(), "server": "http://selector:8080"})


@pytest.mark.parametrize(
    "body",
    [
        _answer(population="other"),
        _answer(device_id="../etc"),
        _answer(credential="x" * 600),
        _answer(expires_at="never"),
        {"detail": "ok"},
    ],
)
def test_unusable_enrollment_answers_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(Refused):
        _enroll(lambda _: httpx.Response(201, json=body))


def test_enrollment_refusals_are_typed() -> None:
    with pytest.raises(Refused) as refused:
        _enroll(lambda _: httpx.Response(401, json={"detail": "bad token"}))
    assert refused.value.status == 401
    with pytest.raises(Refused) as limited:
        _enroll(lambda _: httpx.Response(429, headers={"retry-after": "3"}, json={}))
    assert (limited.value.status, limited.value.retry_after) == (429, 3.0)
    with pytest.raises(ServerBusy):
        _enroll(lambda _: httpx.Response(503, json={"detail": "store down"}))
    with pytest.raises(Refused):  # 200 is not 201
        _enroll(lambda _: httpx.Response(200, json=_answer()))


def test_renew_sends_the_credential_and_keeps_the_device() -> None:
    old = Identity.from_dict({**_answer(), "server": "http://selector:8080"})
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=_answer(credential="v1.bmV3.c2ln", renew_after=175.0))

    async def renew(h: Callable[[httpx.Request], httpx.Response]) -> Identity:
        client = _client(h)
        try:
            return await client.renew(old)
        finally:
            await client.aclose()

    new = asyncio.run(renew(handler))
    assert seen[0].url.path == "/v1/enroll/renew"
    assert seen[0].headers["authorization"] == f"Bearer {old.credential}"
    assert seen[0].headers["x-fedfleet-device"] == DEVICE
    assert (new.device_id, new.credential) == (DEVICE, "v1.bmV3.c2ln")
    with pytest.raises(Refused):
        asyncio.run(renew(lambda _: httpx.Response(200, json=_answer(device_id="d-" + "0" * 24))))
