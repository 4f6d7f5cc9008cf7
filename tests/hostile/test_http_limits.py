"""Requests without credentials are cheap; every body is bounded while it streams.

Each attack runs against every device endpoint of a live round (real uvicorn, real Redis,
raw sockets), and every test ends by checking that nothing changed: the committed model is
bit-identical and no report was folded into the round.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
import pytest

from fedfleet.selector.doors import CHECKIN_LIMIT
from tests.hostile.harness import (
    UPDATE_LIMIT,
    Live,
    chunked,
    raw_exchange,
    request_head,
    streamed,
)

pytestmark = pytest.mark.hostile

BIG = 256 * 1024 * 1024
"""What an attacker claims to send; the server must stop reading long before."""
READ_CAP = 48 * 1024 * 1024
"""More than the largest limit plus what loopback socket buffers hold, far less than BIG."""


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    limit: int

    def url_path(self, live: Live, device: str) -> str:
        return self.path.format(round=live.round_key, device=device)


ENDPOINTS = [
    Endpoint("checkin", "POST", "/v1/checkin", CHECKIN_LIMIT),
    Endpoint("report", "POST", "/v1/reports/{round}", UPDATE_LIMIT),
    Endpoint("secagg", "POST", "/v1/secagg/{round}/advertise", UPDATE_LIMIT + (1 << 20)),
    Endpoint("abort", "POST", "/v1/aborts/{round}", 1024),
    Endpoint("task", "GET", "/v1/tasks/{round}?device_id={device}&wait=0", 0),
    Endpoint("checkpoint", "GET", "/v1/checkpoints/0", 0),
]
POSTS = [e for e in ENDPOINTS if e.method == "POST"]
DEVICE = "dev-0"


def credentials(live: Live, endpoint: Endpoint, device: str = DEVICE) -> dict[str, str]:
    if endpoint.name in ("checkin", "checkpoint"):
        return {
            "authorization": f"Bearer {live.keys.device_token(device)}",
            "x-fedfleet-device": device,
        }
    return live.ticketed_headers(device)


@pytest.fixture
def unchanged(live: Live) -> Iterator[None]:
    """The attack in the test must leave the committed model and the round's sums alone."""
    before = live.committed()
    folded = live.folded()
    yield
    assert live.committed() == before  # version and bytes, bit for bit
    assert live.folded() == folded


def _no_echo(text: bytes, marker: bytes) -> None:
    assert marker not in text
    assert len(text) < 1024


# -- credentials first -------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["declared", "chunked"])
@pytest.mark.parametrize("endpoint", POSTS, ids=lambda e: e.name)
def test_a_body_without_credentials_is_never_read(
    live: Live, endpoint: Endpoint, framing: str, unchanged: None
) -> None:
    length = (
        {"content-length": str(BIG)} if framing == "declared" else {"transfer-encoding": "chunked"}
    )
    head = request_head(
        endpoint.method,
        endpoint.url_path(live, DEVICE),
        {"content-type": "application/json", **length},
    )
    body = streamed(BIG) if framing == "declared" else chunked(BIG)
    answer = raw_exchange(live.selector_url, head, body)
    assert answer.status in (401, 403), answer
    assert answer.sent < READ_CAP
    assert b"connection: close" in answer.head.lower()
    assert len(answer.body) < 256


@pytest.mark.parametrize("endpoint", POSTS, ids=lambda e: e.name)
def test_forged_credentials_are_refused_before_the_body(
    live: Live, endpoint: Endpoint, unchanged: None
) -> None:
    forged = {
        "authorization": "Bearer " + "0" * 64,
        "x-fedfleet-device": DEVICE,
        "x-fedfleet-ticket": "0" * 64,
        "x-fedfleet-aggregator": live.assigned[DEVICE],
        "x-fedfleet-examples": "10",
    }
    head = request_head(
        endpoint.method, endpoint.url_path(live, DEVICE), {**forged, "content-length": str(BIG)}
    )
    answer = raw_exchange(live.selector_url, head, streamed(BIG))
    assert answer.status in (401, 403), answer
    assert answer.sent < READ_CAP


def test_a_token_for_one_device_does_not_admit_another(live: Live, unchanged: None) -> None:
    r = httpx.post(
        f"{live.selector_url}/v1/checkin",
        json={"device_id": "dev-1", "population": "hostile", "charging": True,
              "unmetered": True, "idle": True, "num_examples": 5},
        headers={"authorization": f"Bearer {live.keys.device_token('dev-0')}",
                 "x-fedfleet-device": "dev-0"},
        timeout=10,
    )  # fmt: skip
    assert r.status_code == 401


def test_a_ticket_for_one_round_does_not_admit_another(live: Live, unchanged: None) -> None:
    other = f"a{int(live.round_key[1:]) + 1}"
    r = httpx.post(
        f"{live.selector_url}/v1/reports/{other}",
        content=b"x" * 100,
        headers=live.ticketed_headers(DEVICE),
        timeout=10,
    )
    assert r.status_code == 403


def test_internal_endpoints_need_the_internal_token_before_the_body(
    live: Live, unchanged: None
) -> None:
    url = next(iter(live.aggregator_urls.values()))
    for path in (f"/internal/v1/reports/{live.round_key}",
                 f"/internal/v1/secagg/{live.round_key}/advertise"):  # fmt: skip
        head = request_head(
            "POST",
            path,
            {**live.ticketed_headers(DEVICE), "authorization": f"Bearer {'f' * 64}",
             "transfer-encoding": "chunked"},
        )  # fmt: skip
        answer = raw_exchange(url, head, chunked(BIG))
        assert answer.status == 401, answer
        assert answer.sent < READ_CAP


# -- every body is bounded ---------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["declared", "chunked"])
@pytest.mark.parametrize("endpoint", POSTS, ids=lambda e: e.name)
def test_an_oversized_body_is_refused_while_it_streams(
    live: Live, endpoint: Endpoint, framing: str, unchanged: None
) -> None:
    # Another device's credentials for the check-in: dev-0's selection must stay intact.
    device = "dev-9" if endpoint.name == "checkin" else DEVICE
    length = (
        {"content-length": str(BIG)} if framing == "declared" else {"transfer-encoding": "chunked"}
    )
    head = request_head(
        endpoint.method,
        endpoint.url_path(live, device),
        {"content-type": "application/octet-stream", **credentials(live, endpoint, device),
         **length},
    )  # fmt: skip
    body = streamed(BIG) if framing == "declared" else chunked(BIG)
    answer = raw_exchange(live.selector_url, head, body)
    assert answer.status == 413, answer
    assert answer.sent < READ_CAP
    if framing == "declared":  # refused on the header alone: not one body byte was needed
        assert answer.sent < len(head) + 8 * 1024 * 1024
    assert len(answer.body) < 256


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.limit == 0], ids=lambda e: e.name)
def test_routes_without_a_body_take_none(live: Live, endpoint: Endpoint, unchanged: None) -> None:
    head = request_head(
        endpoint.method,
        endpoint.url_path(live, DEVICE),
        {**credentials(live, endpoint), "transfer-encoding": "chunked"},
    )
    answer = raw_exchange(live.selector_url, head, chunked(BIG))
    assert answer.status == 413, answer
    assert answer.sent < READ_CAP


def test_unknown_paths_take_no_body(live: Live, unchanged: None) -> None:
    head = request_head("POST", "/v1/anything", {"content-length": str(BIG)})
    answer = raw_exchange(live.selector_url, head, streamed(BIG))
    assert answer.status == 413, answer
    assert answer.sent < READ_CAP


# -- errors never echo input -------------------------------------------------------------------

MARKER = b"ECHO-" + b"Z" * 400


def test_a_check_in_of_the_wrong_shape_gets_a_short_422_without_the_input(
    live: Live, unchanged: None
) -> None:
    checkin = ENDPOINTS[0]
    cases = [
        b'{"device_id": "dev-9", "population": "hostile", "charging": "' + MARKER + b'"}',
        b'{"device_id": "dev-9", "' + MARKER[:300] + b'": 1}',
        b'{"device_id": "dev-9", ' + MARKER[:500],  # not JSON at all
        json.dumps([MARKER.decode()] * 2).encode(),
    ]
    for body in cases:
        r = httpx.post(
            f"{live.selector_url}/v1/checkin",
            content=body,
            headers={**credentials(live, checkin, "dev-9"), "content-type": "application/json"},
            timeout=10,
        )
        assert r.status_code in (401, 422), r.text
        _no_echo(r.content, MARKER[:40])


def test_a_bad_report_header_gets_a_short_error_without_the_input(
    live: Live, unchanged: None
) -> None:
    headers = {**live.ticketed_headers(DEVICE), "x-fedfleet-examples": MARKER.decode()}
    r = httpx.post(
        f"{live.selector_url}/v1/reports/{live.round_key}",
        content=b"x" * 100,
        headers=headers,
        timeout=10,
    )
    assert r.status_code == 422
    _no_echo(r.content, MARKER[:40])


# -- headers and URLs are bounded --------------------------------------------------------------


@pytest.mark.parametrize("count", [100, 5000])
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_too_many_headers_are_refused(
    live: Live, endpoint: Endpoint, count: int, unchanged: None
) -> None:
    extra = [(f"x-junk-{i}", "y" * 8) for i in range(count)]
    head = request_head(
        endpoint.method, endpoint.url_path(live, DEVICE), credentials(live, endpoint), extra=extra
    )
    answer = raw_exchange(live.selector_url, head)
    assert answer.status == 431, answer


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_an_oversized_header_is_refused(live: Live, endpoint: Endpoint, unchanged: None) -> None:
    head = request_head(
        endpoint.method,
        endpoint.url_path(live, DEVICE),
        credentials(live, endpoint),
        extra=[("x-junk", "y" * 64 * 1024)],
    )
    answer = raw_exchange(live.selector_url, head)
    assert answer.status == 431, answer


def test_an_oversized_url_is_refused(live: Live, unchanged: None) -> None:
    head = request_head("GET", "/v1/checkpoints/0?" + "a=b&" * 4096, {})
    answer = raw_exchange(live.selector_url, head)
    assert answer.status == 414, answer


# -- slow and idle connections -----------------------------------------------------------------


def _connect(url: str) -> socket.socket:
    parts = urlparse(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    return sock


def _closed_by_server(sock: socket.socket, within: float = 30.0) -> bool:
    """True once the server closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_an_idle_connection_is_closed(live: Live) -> None:
    sock = _connect(live.selector_url)
    try:
        assert _closed_by_server(sock)
    finally:
        sock.close()


def test_headers_sent_a_byte_at_a_time_are_cut_off(live: Live, unchanged: None) -> None:
    head = request_head("POST", "/v1/checkin", credentials(live, ENDPOINTS[0]))
    sock = _connect(live.selector_url)
    sent = 0
    try:
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            time.sleep(0.1)  # ~60 s for the whole head: far beyond the 1 s header timeout
        assert sent < len(head), "the server waited for the whole slow header"
    finally:
        sock.close()


@pytest.mark.parametrize("endpoint", POSTS, ids=lambda e: e.name)
def test_a_stalled_body_is_cut_off(live: Live, endpoint: Endpoint, unchanged: None) -> None:
    device = "dev-9" if endpoint.name == "checkin" else DEVICE
    head = request_head(
        endpoint.method,
        endpoint.url_path(live, device),
        {**credentials(live, endpoint, device), "content-length": "1000"},
    )
    sock = _connect(live.selector_url)
    try:
        sock.sendall(head + b"{")
        assert _closed_by_server(sock)
    finally:
        sock.close()


@pytest.mark.timeout(120)
def test_check_ins_are_served_while_hundreds_of_connections_hang(live: Live) -> None:
    hanging: list[socket.socket] = []
    try:
        for _ in range(300):
            sock = _connect(live.selector_url)
            sock.sendall(b"POST /v1/checkin HTTP/1.1\r\nhost: x\r\n")  # and never finish
            hanging.append(sock)
        with httpx.Client(timeout=20) as client:
            for i in range(20):
                device = f"legit-{i}"
                r = client.post(
                    f"{live.selector_url}/v1/checkin",
                    json={"device_id": device, "population": "hostile", "charging": True,
                          "unmetered": True, "idle": True, "num_examples": 5},
                    headers={"authorization": f"Bearer {live.keys.device_token(device)}",
                             "x-fedfleet-device": device},
                )  # fmt: skip
                assert r.status_code == 200, r.text
        assert all(_closed_by_server(s) for s in hanging)
    finally:
        for sock in hanging:
            sock.close()
