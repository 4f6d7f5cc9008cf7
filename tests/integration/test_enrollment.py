"""Enrollment and device credentials on a live selector: real uvicorn, real redis-server.

A selector given its population's secret enrolls devices (the server picks their ids), accepts
their credentials on the check-in and the checkpoint download besides job tokens, renews them,
refuses them once revoked (within a few ticks; at once on renew), and limits both enrollments
and each device's check-ins. Every refusal happens at the gate, before a body is read.
"""

from __future__ import annotations

import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedfleet.cli import main
from fedfleet.core.spec import FLJob
from fedfleet.local import LocalDeployment
from fedfleet.selector.app import create_app as selector_app
from fedfleet.selector.enroll_routes import EnrollmentSettings
from fedfleet.selector.ratelimit import RateLimit
from fedfleet.service.enrollment import PopulationKeys
from fedfleet.service.keys import JobKeys, new_secret
from fedfleet.store.redis import RedisStore
from tests.hostile.harness import raw_exchange, request_head
from tests.integration.deployed import small_job
from tests.uvicorn_thread import listen, serve

pytestmark = pytest.mark.integration

TICK = 0.1
SECRET = bytes.fromhex("5e" * 32)


@dataclass
class Live:
    url: str
    store: RedisStore
    job: FLJob
    keys: JobKeys
    population: PopulationKeys


@contextmanager
def selector(
    store: RedisStore,
    *,
    population: str = "phones",
    secret: bytes | None = SECRET,
    settings: EnrollmentSettings | None = None,
) -> Iterator[Live]:
    job = small_job(f"enroll-{population}", population=population)
    keys = JobKeys.from_secret(new_secret())
    sock, url = listen()
    app = selector_app(
        job,
        store,
        keys,
        actor_id="selector-0",
        address=url,
        tick_seconds=TICK,
        population_secret=secret,
        enrollment=settings,
    )
    with serve(app, sock=sock):
        yield Live(url, store, job, keys, PopulationKeys.from_secret(SECRET, population))


@pytest.fixture
def store(redis_url: str, redis_prefix: str) -> Iterator[RedisStore]:
    s = RedisStore.from_url(redis_url, prefix=redis_prefix)
    yield s
    s.close()


@pytest.fixture
def live(store: RedisStore) -> Iterator[Live]:
    with selector(store) as s:
        yield s


def enroll(live: Live, token: str | None = None, body: Any = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token or live.population.enroll_token}"}
    payload = {"population": live.job.spec.population} if body is None else body
    return httpx.post(f"{live.url}/v1/enroll", json=payload, headers=headers, timeout=10)


def device_headers(device: str, credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}", "x-fedfleet-device": device}


def check_in(live: Live, device: str, credential: str) -> httpx.Response:
    body = {"device_id": device, "population": live.job.spec.population, "charging": True,
            "unmetered": True, "idle": True, "num_examples": 20}  # fmt: skip
    return httpx.post(
        f"{live.url}/v1/checkin", json=body, headers=device_headers(device, credential), timeout=10
    )


def checkpoint(live: Live, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(f"{live.url}/v1/checkpoints/0", headers=headers, timeout=10)


def renew(live: Live, device: str, credential: str) -> httpx.Response:
    return httpx.post(
        f"{live.url}/v1/enroll/renew", headers=device_headers(device, credential), timeout=10
    )


def enrolled(live: Live) -> tuple[str, str]:
    r = enroll(live)
    assert r.status_code == 201, r.text
    return r.json()["device_id"], r.json()["credential"]


def test_enroll_then_check_in_and_download_with_the_credential(live: Live) -> None:
    before = time.time()
    r = enroll(live)
    assert r.status_code == 201, r.text
    doc = r.json()
    assert set(doc) == {"device_id", "population", "credential", "issued_at", "expires_at",
                        "renew_after"}  # fmt: skip
    device, credential = doc["device_id"], doc["credential"]
    assert doc["population"] == "phones" and device.startswith("d-") and len(device) == 26
    assert int(before) <= doc["issued_at"] <= time.time()
    assert doc["expires_at"] - doc["issued_at"] == 30 * 86_400
    assert doc["renew_after"] == doc["issued_at"] + 15 * 86_400
    claims = live.population.verify(credential, device, time.time())
    assert claims is not None and claims.device_id == device

    answer = check_in(live, device, credential)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] in ("reconnect", "selected")

    got = checkpoint(live, device_headers(device, credential))
    assert got.status_code == 200 and got.content[:4] == b"FFA1"
    assert checkpoint(live, {}).status_code == 401
    head, payload, sig = credential.split(".")
    forged = f"{head}.{payload}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"
    refused = checkpoint(live, device_headers(device, forged))
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert check_in(live, device, forged).status_code == 401
    # another enrolled device's credential, presented for this device
    other, other_credential = enrolled(live)
    assert other != device
    assert check_in(live, device, other_credential).status_code == 401
    assert checkpoint(live, device_headers(device, other_credential)).status_code == 401


def test_job_tokens_still_work_beside_credentials(live: Live) -> None:
    assert check_in(live, "sim-1", live.keys.device_token("sim-1")).status_code == 200
    assert checkpoint(live, device_headers("sim-1", live.keys.device_token("sim-1"))).is_success
    # ... but a job token cannot renew: only a credential can
    assert renew(live, "sim-1", live.keys.device_token("sim-1")).status_code == 401


def test_renew_gives_a_new_credential_for_the_same_device(live: Live) -> None:
    device, credential = enrolled(live)
    time.sleep(1.05)  # a later iat, so the new credential differs in more than its jti
    r = renew(live, device, credential)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["device_id"] == device and doc["credential"] != credential
    old = live.population.verify(credential, device, time.time())
    new = live.population.verify(doc["credential"], device, time.time())
    assert old is not None and new is not None and new.issued_at > old.issued_at
    assert check_in(live, device, doc["credential"]).status_code == 200
    assert renew(live, device, "v1.e30.AAAA").status_code == 401


def test_a_revoked_device_is_refused(live: Live) -> None:
    device, credential = enrolled(live)
    keeper, keeper_credential = enrolled(live)
    assert check_in(live, device, credential).status_code == 200
    live.store.revoke_device("phones", device, time.time())
    # renew reads the store itself: refused at once
    assert renew(live, device, credential).status_code == 401
    # check-ins see the revocation once a tick refreshed the selector's view
    deadline = time.monotonic() + 30
    status = 200
    while status != 401 and time.monotonic() < deadline:
        status = check_in(live, device, credential).status_code
        time.sleep(TICK)
    assert status == 401
    assert checkpoint(live, device_headers(device, credential)).status_code == 401
    assert check_in(live, keeper, keeper_credential).status_code == 200  # others unaffected


def test_enrollment_refusals(live: Live, store: RedisStore) -> None:
    wrong = enroll(live, token="ab" * 32)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    elsewhere = enroll(live, body={"population": "tablets"})
    assert elsewhere.status_code == 404 and elsewhere.json() == {"detail": "unknown population"}
    assert enroll(live, body={"population": "phones", "device_id": "d-mine"}).status_code == 422
    assert enroll(live, body={"population": 7}).status_code == 422
    # the enroll token is not a credential, on any device door
    token = live.population.enroll_token
    assert check_in(live, "d-1", token).status_code == 401
    assert checkpoint(live, device_headers("d-1", token)).status_code == 401
    assert renew(live, "d-1", token).status_code == 401
    # a selector without a population secret has no enrollment
    with selector(store, population="phones", secret=None) as plain:
        assert enroll(plain).status_code == 404
        device, credential = enrolled(live)
        assert check_in(plain, device, credential).status_code == 401


def test_a_credential_of_another_population_is_refused(live: Live, store: RedisStore) -> None:
    device, credential = enrolled(live)
    with selector(store, population="tablets") as tablets:  # the same secret
        assert tablets.population.enroll_token == live.population.enroll_token
        assert check_in(tablets, device, credential).status_code == 401
        assert checkpoint(tablets, device_headers(device, credential)).status_code == 401
        assert renew(tablets, device, credential).status_code == 401
        assert enroll(tablets, body={"population": "phones"}).status_code == 404


def test_an_oversized_enroll_body_is_refused_before_it_is_read(live: Live) -> None:
    head = request_head(
        "POST",
        "/v1/enroll",
        {"authorization": f"Bearer {live.population.enroll_token}",
         "content-type": "application/json", "content-length": str(10 * 1024 * 1024)},
    )  # fmt: skip
    answer = raw_exchange(live.url, head, [b"x" * 65536] * 160, timeout=15)
    assert answer.status == 413
    assert answer.sent < 2 * 1024 * 1024  # refused on the declared length, not after the body
    # without the enroll token: 401, before the body as well
    head = request_head(
        "POST", "/v1/enroll", {"content-type": "application/json", "content-length": "500"}
    )
    assert raw_exchange(live.url, head, [b"{" * 500], timeout=15).status == 401


def test_check_ins_and_enrollments_are_rate_limited(store: RedisStore) -> None:
    settings = EnrollmentSettings(enroll_rate=RateLimit(0.001, 2), checkin_rate=RateLimit(0.001, 3))
    with selector(store, settings=settings) as live:
        device, credential = enrolled(live)
        other, other_credential = enrolled(live)
        third = enroll(live)
        assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
        statuses = [check_in(live, device, credential).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        limited = check_in(live, device, credential)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert check_in(live, other, other_credential).status_code == 200  # per device
        # job-token devices (the simulated fleet) are not limited per device
        sim = live.keys.device_token("sim-1")
        assert all(check_in(live, "sim-1", sim).status_code == 200 for _ in range(6))


@pytest.mark.timeout(240)
def test_a_local_deployment_gives_its_selectors_the_population_secret() -> None:
    secret = new_secret()
    job = small_job("enroll-local", population="edge")
    with LocalDeployment(
        job, selectors=1, aggregators=1, coordinators=1, population_secret=secret
    ) as d:
        path = d.workdir / "population-secret"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert bytes.fromhex(path.read_text()) == secret
        keys = PopulationKeys.from_secret(secret, "edge")
        live = Live(d.urls("selector")[0], None, job, d.keys, keys)  # type: ignore[arg-type]
        device, credential = enrolled(live)
        assert check_in(live, device, credential).status_code == 200
        assert checkpoint(live, device_headers(device, credential)).status_code == 200
        assert enroll(live, token="00" * 32).status_code == 401


def test_the_cli_revokes_devices(
    redis_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    population = f"cli-{secrets.token_hex(4)}"
    store = RedisStore.from_url(redis_url)  # the CLI's default key prefix
    try:
        with selector(store, population=population) as live:
            device, credential = enrolled(live)
            keeper, keeper_credential = enrolled(live)
            assert check_in(live, device, credential).status_code == 200
            argv = ["population", "revoke", "--store", redis_url, "--population", population]
            assert main([*argv, device]) == 0
            assert f"revoked {device} in {population}" in capsys.readouterr().out
            assert set(store.revoked_devices(population)) == {device}
            assert renew(live, device, credential).status_code == 401
            assert renew(live, keeper, keeper_credential).status_code == 200
            secret_file = tmp_path / "population-secret"
            secret_file.write_bytes(SECRET)  # raw bytes work as well as hex
            assert main(["population", "token", "--secret-file", str(secret_file)]) == 0
            printed = capsys.readouterr().out.strip()
            assert printed == live.population.enroll_token
            assert enroll(live, token=printed).status_code == 201
    finally:
        store.close()
