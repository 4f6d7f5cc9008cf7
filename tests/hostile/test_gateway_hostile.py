"""The population gateway against hostile and unlucky devices, on a real uvicorn server.

The gateway (``fedfleet.gateway``) holds no job: what it knows of the population's jobs is the
routes announced in the store, which the test writes itself (a route to an address where no
selector listens, with small body limits). Every refusal here happens at the gateway, from
headers or from the route's limits, before anything is relayed:

* a ticket the gateway did not issue (a raw selector ticket, one for another device or round,
  one re-signed by another population) is 403, whatever the body;
* a report over the route's own limit is 413 from its declared length;
* a call whose route is gone is 410 with a reconnect window;
* a check-in the gateway cannot place (no job, the only selector unreachable, another
  population) gets a window or 503 with ``Retry-After``, never a selection.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from fedfleet.gateway.app import create_app
from fedfleet.gateway.routes import Route, RouteKeys, announce, route_scope
from fedfleet.service.enrollment import PopulationKeys, enroll_token
from fedfleet.store.memory import MemoryStore
from tests.uvicorn_thread import serve

SECRET = b"p" * 32
POP = "hostile-gw"


@pytest.fixture
def gateway() -> Iterator[tuple[str, MemoryStore]]:
    store = MemoryStore()
    with serve(create_app(POP, SECRET, store, tick_seconds=0.05)) as url:
        yield url, store


def _credential(device: str) -> dict[str, str]:
    token = PopulationKeys.from_secret(SECRET, POP).issue(device, time.time()).token
    return {"authorization": f"Bearer {token}", "x-fedfleet-device": device}


def _checkin(url: str, device: str, population: str = POP) -> httpx.Response:
    body = {
        "device_id": device,
        "population": population,
        "charging": True,
        "unmetered": True,
        "idle": True,
        "num_examples": 5,
    }
    return httpx.post(f"{url}/v1/checkin", json=body, headers=_credential(device), timeout=10)


def _announced(store: MemoryStore, job: str, address: str) -> Route:
    route = Route(
        job=job,
        actor="selector-0",
        address=address,
        priority=0,
        weight=1,
        open=True,
        report_limit=1000,
        secagg_limit=1000,
    )
    announce(store, route_scope(POP, SECRET), route)
    return route


def _dead_route(store: MemoryStore) -> Route:
    return _announced(store, "ns/job", "http://127.0.0.1:9")  # discard port: nobody listens


def _wait_routes(url: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/readyz", timeout=5).json().get("routes") == n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the gateway never saw {n} routes")


def test_enrollment_and_check_ins_with_no_job(gateway: tuple[str, MemoryStore]) -> None:
    url, _ = gateway
    r = httpx.post(
        f"{url}/v1/enroll",
        json={"population": POP},
        headers={"authorization": f"Bearer {enroll_token(SECRET)}"},
        timeout=10,
    )
    assert r.status_code == 201 and r.json()["device_id"].startswith("d-"), r.text
    answer = _checkin(url, "d-1").json()
    assert answer["outcome"] == "reconnect" and answer["reason"] == "no-job"
    assert _checkin(url, "d-1", "other").json()["reason"] == "unknown-population"
    r = httpx.post(
        f"{url}/v1/checkin",
        json={"device_id": "d-2"},
        headers={"authorization": "Bearer nope", "x-fedfleet-device": "d-2"},
        timeout=10,
    )
    assert r.status_code == 401


def test_an_unreachable_selector_is_503_never_a_selection(
    gateway: tuple[str, MemoryStore],
) -> None:
    url, store = gateway
    _dead_route(store)
    _wait_routes(url, 1)
    r = _checkin(url, "d-1")
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text


def test_tickets_the_gateway_did_not_issue_are_refused_before_the_body(
    gateway: tuple[str, MemoryStore],
) -> None:
    url, store = gateway
    route = _dead_route(store)
    _wait_routes(url, 1)
    keys = RouteKeys(SECRET)
    good = keys.wrap(route.id, "a3", "d-1", "f" * 64)

    def report(ticket: str, device: str = "d-1", round_key: str = "a3", size: int = 10) -> int:
        r = httpx.post(
            f"{url}/v1/reports/{round_key}",
            headers={
                "x-fedfleet-device": device,
                "x-fedfleet-ticket": ticket,
                "x-fedfleet-examples": "5",
                "x-fedfleet-aggregator": "aggregator-0",
                "content-type": "application/octet-stream",
            },
            content=b"\0" * size,
            timeout=10,
        )
        return r.status_code

    assert report("f" * 64) == 403  # the selector's own ticket, unwrapped
    assert report(good, device="d-2") == 403
    assert report(good, round_key="a4") == 403
    assert report(RouteKeys(b"q" * 32).wrap(route.id, "a3", "d-1", "f" * 64)) == 403
    assert report(good, round_key="zz9") == 422  # malformed round key, at the door
    assert report(good, size=5000) == 413  # the route's own limit, from the declared length
    # A genuine ticket reaches the relay: the selector is unreachable, so 503 with Retry-After.
    assert report(good) == 503
    store.withdraw_route(route_scope(POP, SECRET), route.id)
    _wait_routes(url, 0)
    assert report(good) == 410  # its selector is gone: check in again
    r = httpx.get(
        f"{url}/v1/tasks/a3",
        params={"device_id": "d-1"},
        headers={"x-fedfleet-ticket": good},
        timeout=10,
    )
    assert r.status_code == 410 and r.json()["outcome"] == "reconnect", r.text


def test_a_route_answering_garbage_is_skipped_not_a_server_error(
    gateway: tuple[str, MemoryStore],
) -> None:
    from fastapi import FastAPI
    from fastapi.responses import Response

    liar = FastAPI()

    @liar.post("/v1/checkin")
    async def checkin() -> Response:
        return Response(b"<html>not a selector</html>", media_type="text/html")

    @liar.get("/v1/tasks/{round_key}")
    async def task(round_key: str) -> Response:
        return Response(b'{"no": "model_version"}', media_type="application/json")

    url, store = gateway
    with serve(liar) as liar_url:
        route = _announced(store, "ns/liar", liar_url)
        _wait_routes(url, 1)
        r = _checkin(url, "d-1")
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        ticket = RouteKeys(SECRET).wrap(route.id, "a3", "d-1", "f" * 64)
        r = httpx.get(
            f"{url}/v1/tasks/a3",
            params={"device_id": "d-1"},
            headers={"x-fedfleet-ticket": ticket},
            timeout=10,
        )
        assert r.status_code == 410 and r.json()["outcome"] == "reconnect", r.text
