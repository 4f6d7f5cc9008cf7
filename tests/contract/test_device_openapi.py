"""The selector's OpenAPI document is a complete contract for devices.

A live selector (real uvicorn, with its coordinator and aggregator) serves ``/openapi.json``;
the test checks that every device route names its credential, that the binary bodies are
declared as such, and that every status the selector really answers — probed here with real
requests, good and hostile, and the ones the hostile tier asserts — is declared for its route,
with a body that matches the declared schema.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from pydantic import BaseModel

from fedfleet.core.protocol import report_ticket
from fedfleet.core.serde import decode_arrays, encode_arrays
from fedfleet.selector import contract
from fedfleet.selector.app import CheckInResponse, TaskResponse
from fedfleet.selector.app import create_app as selector_app
from fedfleet.selector.enroll_routes import Enrollment, EnrollmentSettings
from fedfleet.selector.ratelimit import RateLimit
from fedfleet.service.enrollment import PopulationKeys
from tests.integration.test_http_fleet import Deployment, _job, deployment
from tests.uvicorn_thread import listen, serve

pytestmark = pytest.mark.integration

ROUTES = {
    "checkin": ("post", "/v1/checkin"),
    "task": ("get", "/v1/tasks/{round_key}"),
    "checkpoint": ("get", "/v1/checkpoints/{version}"),
    "report": ("post", "/v1/reports/{round_key}"),
    "secagg": ("post", "/v1/secagg/{round_key}/{step}"),
    "abort": ("post", "/v1/aborts/{round_key}"),
    "enroll": ("post", "/v1/enroll"),
    "renew": ("post", "/v1/enroll/renew"),
}
HOSTILE_OBSERVED = {
    # Statuses tests/hostile asserts per route (test_http_limits, test_exactly_once).
    "checkin": {401, 413, 431},
    "task": {401, 403, 413, 422},
    "checkpoint": {401, 413},
    "report": {202, 401, 403, 409, 413, 422},
    "secagg": {401, 403, 413},
    "abort": {202, 401, 403, 413},
}
MODELS: dict[str, type[BaseModel]] = {
    m.__name__: m
    for m in (
        CheckInResponse,
        TaskResponse,
        contract.Problem,
        contract.ValidationProblem,
        contract.Waiting,
        contract.Accepted,
        contract.Noted,
        contract.ReconnectWindow,
        Enrollment,
    )
}
DEVICE = "probe-1"


@pytest.fixture(scope="module")
def live() -> Iterator[Deployment]:
    with deployment(_job("openapi-contract")) as d:
        yield d


@pytest.fixture(scope="module")
def document(live: Deployment) -> dict[str, Any]:
    r = httpx.get(f"{live.selector_url}/openapi.json", timeout=10)
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


def _op(doc: dict[str, Any], route: str) -> dict[str, Any]:
    method, path = ROUTES[route]
    op: dict[str, Any] = doc["paths"][path][method]
    return op


def test_every_device_route_is_documented(document: dict[str, Any]) -> None:
    device_paths = {p for p in document["paths"] if p.startswith("/v1/")}
    assert device_paths == {path for _, path in ROUTES.values()}


def test_every_route_names_its_credential(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["deviceToken"] == {**schemes["deviceToken"], "type": "http", "scheme": "bearer"}
    for name, header in (("deviceId", "x-fedfleet-device"), ("reportTicket", "x-fedfleet-ticket")):
        assert (schemes[name]["type"], schemes[name]["in"], schemes[name]["name"]) == (
            "apiKey",
            "header",
            header,
        )
    for route in ROUTES:
        security = _op(document, route).get("security")
        assert security, f"{route} declares no security"
        for requirement in security:
            assert set(requirement) <= set(schemes), route
    assert {"deviceToken", "deviceId"} == set(_op(document, "checkin")["security"][0])
    assert {"deviceToken", "deviceId"} == set(_op(document, "checkpoint")["security"][0])
    for route in ("report", "secagg", "abort", "task"):
        assert "reportTicket" in _op(document, route)["security"][0], route
    assert [{"enrollToken": []}] == _op(document, "enroll")["security"]
    assert {"deviceToken", "deviceId"} == set(_op(document, "renew")["security"][0])
    assert schemes["enrollToken"] == {**schemes["enrollToken"], "type": "http", "scheme": "bearer"}


def test_binary_bodies_are_declared(document: dict[str, Any]) -> None:
    binary = {"type": "string", "format": "binary"}
    checkpoint = _op(document, "checkpoint")["responses"]["200"]["content"]
    assert checkpoint == {"application/octet-stream": {"schema": binary}}
    for route in ("report", "secagg"):
        body = _op(document, route)["requestBody"]["content"]
        assert body["application/octet-stream"]["schema"] == binary, route


def test_task_plan_and_privacy_are_typed(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    task = schemas["TaskResponse"]["properties"]
    assert task["task"]["$ref"].endswith("/TaskDescription")
    assert task["plan"]["$ref"].endswith("/PlanSpec")
    plan = schemas["PlanSpec"]["properties"]
    assert {"localEpochs", "batchSize", "learningRate", "proximalMu"} <= set(plan)
    config = schemas["TaskDescription"]["properties"]["config"]["anyOf"][0]
    assert {"kind", "inputs", "classes", "hidden"} <= set(config["properties"])
    privacy = schemas["PrivacyDescription"]["properties"]
    assert {"weight_cap", "clip_norm", "secure_aggregation", "ring_bits"} <= set(privacy)
    for name in ("SecAggKeyAdvert", "SecAggRoster", "SecAggInbox", "SecAggUnmaskShares"):
        assert name in schemas


def test_statuses_the_hostile_tier_observes_are_declared(document: dict[str, Any]) -> None:
    for route, statuses in HOSTILE_OBSERVED.items():
        declared = {int(s) for s in _op(document, route)["responses"]}
        assert statuses <= declared, (route, statuses - declared)


# -- probes: real requests, each status checked against the document -------------------------


def _ticket(live: Deployment, round_key: str, device: str = DEVICE) -> str:
    return report_ticket(live.keys.ticket_key, live.job.name, round_key, device)


def _token_headers(live: Deployment, device: str = DEVICE) -> dict[str, str]:
    return {
        "authorization": f"Bearer {live.keys.device_token(device)}",
        "x-fedfleet-device": device,
    }


def _ticket_headers(live: Deployment, round_key: str) -> dict[str, str]:
    return {
        "x-fedfleet-device": DEVICE,
        "x-fedfleet-ticket": _ticket(live, round_key),
        "x-fedfleet-aggregator": "aggregator-0",
        "x-fedfleet-examples": "3",
    }


def _raw_status(url: str, head: bytes) -> int:
    parsed = urlparse(url)
    assert parsed.hostname is not None and parsed.port is not None
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as s:
        s.sendall(head)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def _check(doc: dict[str, Any], route: str, status: int, body: Any) -> None:
    """``status`` is declared for ``route`` and ``body`` fits the declared JSON schema."""
    responses = _op(doc, route)["responses"]
    assert str(status) in responses, f"{route} answered {status}, which is not declared"
    schema = responses[str(status)].get("content", {}).get("application/json", {}).get("schema")
    if schema and "$ref" in schema and body is not None:
        MODELS[schema["$ref"].rsplit("/", 1)[1]].model_validate(body)


def _probe(
    doc: dict[str, Any], route: str, response: httpx.Response, expect: int | set[int]
) -> httpx.Response:
    wanted = {expect} if isinstance(expect, int) else expect
    assert response.status_code in wanted, (route, response.status_code, response.text)
    json_body = (
        response.json()
        if response.headers.get("content-type", "").startswith("application/json")
        else None
    )
    _check(doc, route, response.status_code, json_body)
    return response


def test_checkin_statuses(live: Deployment, document: dict[str, Any]) -> None:
    url = f"{live.selector_url}/v1/checkin"
    good = {
        "device_id": DEVICE,
        "population": live.job.spec.population,
        "charging": True,
        "unmetered": True,
        "idle": True,
        "num_examples": 3,
    }
    r = httpx.post(url, json=good, headers=_token_headers(live), timeout=10)
    answer = _probe(document, "checkin", r, 200).json()
    CheckInResponse.model_validate(answer)
    _probe(document, "checkin", httpx.post(url, json=good, timeout=10), 401)
    wrong = _token_headers(live, "someone-else")
    _probe(document, "checkin", httpx.post(url, json=good, headers=wrong, timeout=10), 401)
    extra = {**good, "admin": True}
    _probe(
        document, "checkin", httpx.post(url, json=extra, headers=_token_headers(live), timeout=10),
        422,
    )  # fmt: skip
    big = {**good, "population": "x" * 2000}
    _probe(
        document, "checkin", httpx.post(url, json=big, headers=_token_headers(live), timeout=10),
        413,
    )  # fmt: skip
    many = {f"x-pad-{i}": "1" for i in range(70)}
    _probe(
        document,
        "checkin",
        httpx.post(url, json=good, headers={**_token_headers(live), **many}, timeout=10),
        431,
    )
    host = urlparse(live.selector_url).netloc
    head = (
        f"POST /v1/checkin HTTP/1.1\r\nhost: {host}\r\ncontent-length: abc\r\n"
        f"authorization: Bearer {live.keys.device_token(DEVICE)}\r\n"
        f"x-fedfleet-device: {DEVICE}\r\n\r\n"
    ).encode()
    _check(document, "checkin", _raw_status(live.selector_url, head), None)


def test_checkpoint_statuses(live: Deployment, document: dict[str, Any]) -> None:
    url = f"{live.selector_url}/v1/checkpoints/0"
    r = _probe(
        document, "checkpoint", httpx.get(url, headers=_token_headers(live), timeout=10), 200
    )
    assert r.headers["content-type"] == "application/octet-stream"
    weights = decode_arrays(r.content)
    assert [w.shape for w in weights] == [(64, 10), (10,)]
    assert all(w.dtype == np.float32 for w in weights)
    again = httpx.get(
        url, headers={**_token_headers(live), "if-none-match": r.headers["etag"]}, timeout=10
    )
    _probe(document, "checkpoint", again, 304)
    _probe(document, "checkpoint", httpx.get(url, timeout=10), 401)
    missing = f"{live.selector_url}/v1/checkpoints/999999"
    _probe(
        document, "checkpoint", httpx.get(missing, headers=_token_headers(live), timeout=10), 404
    )
    bad = f"{live.selector_url}/v1/checkpoints/minus-one"
    _probe(document, "checkpoint", httpx.get(bad, headers=_token_headers(live), timeout=10), 422)
    with_body = httpx.request("GET", url, content=b"x" * 10, headers=_token_headers(live))
    _probe(document, "checkpoint", with_body, 413)


def test_task_poll_statuses(live: Deployment, document: dict[str, Any]) -> None:
    base = f"{live.selector_url}/v1/tasks"
    query = {"device_id": DEVICE, "wait": "0"}
    _probe(document, "task", httpx.get(f"{base}/a1", params=query, timeout=10), 401)
    forged = {"x-fedfleet-ticket": "0" * 64}
    _probe(document, "task", httpx.get(f"{base}/a1", params=query, headers=forged, timeout=10), 403)
    ticket = {"x-fedfleet-ticket": _ticket(live, "a9999")}
    r = httpx.get(f"{base}/a9999", params=query, headers=ticket, timeout=10)
    _probe(document, "task", r, 404)
    r = httpx.get(f"{base}/round-1", params=query, headers=ticket, timeout=10)
    _probe(document, "task", r, 422)
    r = httpx.get(f"{base}/a9999", params={**query, "wait": "99"}, headers=ticket, timeout=10)
    _probe(document, "task", r, 422)


def test_report_and_abort_statuses(live: Deployment, document: dict[str, Any]) -> None:
    update = encode_arrays([np.zeros((64, 10), np.float32), np.zeros(10, np.float32)])
    url = f"{live.selector_url}/v1/reports/a9999"
    _probe(document, "report", httpx.post(url, content=update, timeout=10), 401)
    forged = {**_ticket_headers(live, "a9999"), "x-fedfleet-ticket": "0" * 64}
    _probe(document, "report", httpx.post(url, content=update, headers=forged, timeout=10), 403)
    # A valid ticket for a round nobody runs: the device is mistaken, not waiting out an outage.
    headers = _ticket_headers(live, "a9999")
    _probe(document, "report", httpx.post(url, content=update, headers=headers, timeout=10), 404)
    bad_examples = {**headers, "x-fedfleet-examples": "0"}
    r = httpx.post(url, content=update, headers=bad_examples, timeout=10)
    _probe(document, "report", r, 422)
    bad_metrics = {**headers, "x-fedfleet-metrics": '{"Loss": "high"}'}
    _probe(
        document, "report", httpx.post(url, content=update, headers=bad_metrics, timeout=10), 422
    )
    limit = live.job.spec.aggregation.max_update_bytes
    r = httpx.post(url, content=b"\0" * (limit + 1), headers=headers, timeout=30)
    _probe(document, "report", r, 413)

    secagg = f"{live.selector_url}/v1/secagg/a9999/advertise"
    _probe(document, "secagg", httpx.post(secagg, content=b"{}", timeout=10), 401)
    r = httpx.post(secagg, content=b"{}", headers=headers, timeout=10)
    _probe(document, "secagg", r, 404)
    r = httpx.post(f"{live.selector_url}/v1/secagg/a9999/nope", headers=headers, timeout=10)
    _probe(document, "secagg", r, 422)

    abort = f"{live.selector_url}/v1/aborts/a9999"
    body = {"device_id": DEVICE, "reason": "eligibility-lost"}
    _probe(document, "abort", httpx.post(abort, json=body, timeout=10), 401)
    other = {**body, "device_id": "someone-else"}
    _probe(document, "abort", httpx.post(abort, json=other, headers=headers, timeout=10), 403)
    _probe(document, "abort", httpx.post(abort, json=body, headers=headers, timeout=10), 202)
    _probe(document, "abort", httpx.post(abort, json={"x": 1}, headers=headers, timeout=10), 422)


# -- enrollment: a selector of the same job with the population's secret -----------------------

POPULATION_SECRET = bytes.fromhex("a7" * 32)


@pytest.fixture(scope="module")
def enrolling(live: Deployment) -> Iterator[tuple[str, PopulationKeys]]:
    """A second selector of the live job, enrolling devices, with small rate limits."""
    sock, url = listen()
    app = selector_app(
        live.job,
        live.store,
        live.keys,
        actor_id="selector-enroll",
        address=url,
        tick_seconds=0.1,
        population_secret=POPULATION_SECRET,
        enrollment=EnrollmentSettings(
            enroll_rate=RateLimit(0.001, 4), checkin_rate=RateLimit(0.001, 2)
        ),
    )
    with serve(app, sock=sock):
        yield url, PopulationKeys.from_secret(POPULATION_SECRET, live.job.spec.population)


def test_enroll_and_renew_statuses(
    live: Deployment, document: dict[str, Any], enrolling: tuple[str, PopulationKeys]
) -> None:
    url, keys = enrolling
    enroll = f"{url}/v1/enroll"
    token = {"authorization": f"Bearer {keys.enroll_token}"}
    body = {"population": live.job.spec.population}
    r = _probe(document, "enroll", httpx.post(enroll, json=body, headers=token, timeout=10), 201)
    device, credential = r.json()["device_id"], r.json()["credential"]
    _probe(document, "enroll", httpx.post(enroll, json=body, timeout=10), 401)
    other = {"population": "elsewhere"}
    _probe(document, "enroll", httpx.post(enroll, json=other, headers=token, timeout=10), 404)
    extra = {**body, "device_id": "d-mine"}
    _probe(document, "enroll", httpx.post(enroll, json=extra, headers=token, timeout=10), 422)
    big = {"population": "x" * 2000}
    _probe(document, "enroll", httpx.post(enroll, json=big, headers=token, timeout=10), 413)
    for _ in range(4):  # the burst of 4 is spent: 201s and 422s alike
        r = httpx.post(enroll, json=body, headers=token, timeout=10)
    _probe(document, "enroll", r, 429)
    # without a population secret (the live job's own selector): no enrollment
    plain = f"{live.selector_url}/v1/enroll"
    _probe(document, "enroll", httpx.post(plain, json=body, headers=token, timeout=10), 404)

    renew = f"{url}/v1/enroll/renew"
    device_auth = {"authorization": f"Bearer {credential}", "x-fedfleet-device": device}
    r = _probe(document, "renew", httpx.post(renew, headers=device_auth, timeout=10), 200)
    assert r.json()["device_id"] == device
    _probe(document, "renew", httpx.post(renew, headers=token, timeout=10), 401)
    with_body = httpx.post(renew, headers=device_auth, content=b"{}", timeout=10)
    _probe(document, "renew", with_body, 413)
    _probe(document, "renew", httpx.post(renew, headers=device_auth, timeout=10), 429)
    plain_renew = f"{live.selector_url}/v1/enroll/renew"
    r = httpx.post(plain_renew, headers=device_auth, timeout=10)
    _probe(document, "renew", r, 404)

    checkin = f"{url}/v1/checkin"
    good = {"device_id": device, "population": live.job.spec.population, "charging": True,
            "unmetered": True, "idle": True, "num_examples": 3}  # fmt: skip
    # renewals spent the device's two tokens: its next check-in is limited
    r = httpx.post(checkin, json=good, headers=device_auth, timeout=10)
    _probe(document, "checkin", r, 429)
    assert int(r.headers["retry-after"]) >= 1
    checkpoint = f"{url}/v1/checkpoints/0"
    _probe(document, "checkpoint", httpx.get(checkpoint, headers=device_auth, timeout=10), 200)
