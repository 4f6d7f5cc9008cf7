"""Two jobs of one population at the same time, behind the population's gateway.

All real processes: a redis-server, ``fedfleet population gateway`` on one loopback address,
two jobs of the population deployed on that store (each its coordinator, selector and
aggregator processes, their selectors given the population secret), and four
``fedfleet device run`` processes that know only the gateway's URL, the population's name and
its enroll token. It checks what issue #11 §3 promises:

* both jobs, of different priorities, run at once and both are trained to their last round by
  the same devices (selected at the gateway, routed by ticket to the job's selector, their
  checkpoints downloaded through the gateway);
* requests the gateway cannot authenticate are refused before anything is relayed (a ticket it
  did not issue, a checkpoint without a credential, a checkpoint with no route);
* once no job runs, a device is given a reconnect window (``no-job``), not "not needed".
"""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedfleet.core.spec import FLJob
from fedfleet.device.datasets import load_dataset
from fedfleet.local import LocalDeployment
from fedfleet.redis_server import free_port
from fedfleet.service.enrollment import enroll_token
from fedfleet.store.factory import open_store
from tests.device_processes import FedfleetProcess, identity_of, population_job, wait_for
from tests.redis_server import RedisServer
from tests.tls_certificates import certificate

POPULATION = "edge-gw"


def _job(name: str, priority: int) -> FLJob:
    doc = population_job(name, POPULATION, total=3, goal=2, devices=4, timeout=30)
    doc["spec"]["scheduling"] = {"priority": priority, "weight": 1}
    return FLJob.model_validate(doc)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(workdir=tmp_path / "redis") as server:
        yield server


def test_two_jobs_of_a_population_share_its_devices_through_the_gateway(
    tmp_path: Path, redis: RedisServer
) -> None:
    secret = secrets.token_bytes(32)
    secret_file = tmp_path / "population-secret"
    secret_file.write_text(secret.hex())
    secret_file.chmod(0o600)
    token = enroll_token(secret)
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    procs: list[FedfleetProcess] = []
    gateway = FedfleetProcess(
        [
            "population",
            "gateway",
            "--population",
            POPULATION,
            "--population-secret-file",
            str(secret_file),
            "--store",
            redis.url,
            "--port",
            str(port),
            "--tick",
            "0.2",
        ],
        tmp_path / "gateway.log",
    )
    procs.append(gateway)
    x, y = load_dataset("digits")  # type: ignore[arg-type]
    slices = np.array_split(np.random.default_rng(0).permutation(len(y)), 4)
    conditions = tmp_path / "conditions.json"
    conditions.write_text(json.dumps({"charging": True, "idle": True, "unmetered": True}))
    jobs = [_job("gw-low", priority=0), _job("gw-high", priority=10)]
    deployments = [
        LocalDeployment(
            job,
            store_url=redis.url,
            selectors=1,
            aggregators=1,
            coordinators=1,
            population_secret=secret,
        )
        for job in jobs
    ]
    store = open_store(redis.url)
    try:
        wait_for("the gateway", lambda: _ready(url), 60, procs)
        for d in deployments:
            d.start()
        devices = []
        for i in range(4):
            data = tmp_path / f"device-{i}.npz"
            np.savez(data, x=x[slices[i]], y=y[slices[i]])
            devices.append(
                FedfleetProcess(
                    [
                        "device",
                        "run",
                        "--server",
                        url,
                        "--population",
                        POPULATION,
                        "--enroll-token",
                        token,
                        "--data",
                        str(data),
                        "--state",
                        str(tmp_path / f"state-{i}"),
                        "--conditions",
                        str(conditions),
                    ],
                    tmp_path / f"device-{i}.log",
                    tmp_path / f"state-{i}",
                )
            )
        procs.extend(devices)
        ident = wait_for("a device enrolled", devices[0].identity, 60, procs)
        me = {
            "authorization": f"Bearer {ident['credential']}",
            "x-fedfleet-device": ident["device_id"],
        }

        # What the gateway cannot authenticate is refused before anything is relayed.
        assert httpx.get(f"{url}/v1/checkpoints/0", timeout=10).status_code == 401
        r = httpx.get(f"{url}/v1/routes/0123456789abcdef/checkpoints/0", timeout=10)
        assert r.status_code == 401, r.text
        r = httpx.get(f"{url}/v1/routes/0123456789abcdef/checkpoints/0", headers=me, timeout=10)
        assert r.status_code == 404, r.text
        r = httpx.get(f"{url}/v1/checkpoints/0", headers=me, timeout=10)
        assert r.status_code == 404 and "checkpoint_url" in r.text, r.text
        r = httpx.post(
            f"{url}/v1/reports/a1",
            headers={
                **me,
                "x-fedfleet-ticket": "f" * 64,  # a selector's ticket, not wrapped by the gateway
                "x-fedfleet-examples": "5",
                "x-fedfleet-aggregator": "aggregator-0",
                "content-type": "application/octet-stream",
            },
            content=b"\0" * 4096,
            timeout=10,
        )
        assert r.status_code == 403, r.text

        # Both jobs train at once, to their last round, on the same four devices.
        for job in jobs:
            wait_for(
                f"{job.name} succeeded",
                lambda job=job: store.job_state(job.key).get("phase") == "Succeeded",
                300,
                procs,
            )
            assert store.model_version(job.key) == 3
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert _sample(metrics, 'fedfleet_gateway_checkins_total{outcome="selected"}') >= 12
        assert _sample(metrics, 'fedfleet_gateway_relays_total{kind="report",status="202"}') >= 12
        assert (
            _sample(metrics, 'fedfleet_gateway_relays_total{kind="checkpoint",status="200"}') >= 1
        )
    finally:
        for d in deployments:
            d.stop()
        store.close()

    try:
        # The jobs' selectors withdrew: the gateway answers with a window, not "not needed".
        wait_for("no routes", lambda: _routes(url) == 0, 30, procs)
        r = httpx.post(
            f"{url}/v1/checkin",
            headers=me,
            json={
                "device_id": ident["device_id"],
                "population": POPULATION,
                "charging": True,
                "unmetered": True,
                "idle": True,
                "num_examples": 10,
            },
            timeout=10,
        )
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["outcome"] == "reconnect" and answer["reason"] == "no-job", answer
        assert 0 < answer["reconnect_after_s"] < answer["reconnect_within_s"] <= 120
        for i, dev in enumerate(devices):
            assert dev.stop() == 0, dev.text()[-2000:]
            assert identity_of(tmp_path / f"state-{i}")["device_id"]
    finally:
        for p in procs:
            p.stop()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _routes(url: str) -> int:
    return int(httpx.get(f"{url}/readyz", timeout=5).json()["routes"])


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_the_gateway_serves_https_to_devices_that_trust_its_ca(
    tmp_path: Path, redis: RedisServer
) -> None:
    import asyncio

    from fedfleet.core.protocol import CheckIn, Reconnect
    from fedfleet.device.enroll_client import EnrollmentClient
    from fedfleet.device.http_transport import SelectorClient, Unreachable

    ca, cert, key = certificate(tmp_path)
    secret = secrets.token_bytes(32)
    secret_file = tmp_path / "population-secret"
    secret_file.write_text(secret.hex())
    port = free_port("127.0.0.1")
    url = f"https://127.0.0.1:{port}"
    gateway = FedfleetProcess(
        [
            "population",
            "gateway",
            *("--population", POPULATION, "--population-secret-file", str(secret_file)),
            *("--store", redis.url, "--port", str(port)),
            *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        ],
        tmp_path / "gateway.log",
    )

    async def device() -> tuple[str, Reconnect | object]:
        enroller = EnrollmentClient(url, ca_file=str(ca))
        try:
            identity = await enroller.enroll(POPULATION, enroll_token(secret))
        finally:
            await enroller.aclose()
        async with SelectorClient(url, ca_file=str(ca)) as client:
            answer = await client.checkin(
                CheckIn(identity.device_id, POPULATION, True, True, True, 10), identity.credential
            )
        return identity.device_id, answer

    async def untrusting() -> None:
        async with SelectorClient(url) as client:  # the system's CAs only
            await client.checkin(CheckIn("d-x", POPULATION, True, True, True, 1), "token")

    try:
        wait_for("the https gateway", lambda: _ready_tls(url, ca), 60, [gateway])
        device_id, answer = asyncio.run(device())
        assert device_id.startswith("d-")
        assert isinstance(answer, Reconnect) and answer.reason == "no-job", answer
        with pytest.raises(Unreachable, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            asyncio.run(untrusting())
    finally:
        gateway.stop()


def _ready_tls(url: str, ca: Path) -> bool:
    try:
        tls = ssl.create_default_context(cafile=str(ca))
        return httpx.get(f"{url}/readyz", timeout=2, verify=tls).status_code == 200
    except httpx.HTTPError:
        return False
