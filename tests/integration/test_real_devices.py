"""Real device processes against ``fedfleet up --no-fleet``: issue 11's "done when", end to end.

Everything here is a real process: ``fedfleet up MANIFEST --no-fleet --state-dir D`` (its
redis-server is a real one the test owns, so the test can revoke a device through the store),
and six ``fedfleet device run`` processes, each enrolled with the population's enrollment token
from ``D/endpoint.json`` and holding its own slice of the digits data in an ``.npz``. The test
checks what a platform team relies on:

* five devices complete a job of goal count 3 and 5 rounds, and its model commits every round;
* a sixth, stopped with SIGTERM mid-job and started again on its state directory, comes back
  with the same identity and without enrolling again;
* a forged credential is refused (401), so is a checkpoint download without one, and a device
  revoked mid-job is refused: its process stops with status 3 and says why;
* a second FLJob of the same population, started on the same state directory after the first
  ended, is trained by the same running devices with no new token or URL.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from fedfleet.device.datasets import load_dataset
from fedfleet.store.factory import open_store
from tests.device_processes import FedfleetProcess, identity_of, population_job, wait_for
from tests.redis_server import RedisServer

POPULATION = "edge-it"


def _manifest(path: Path, name: str) -> Path:
    doc = population_job(name, POPULATION, total=5, goal=3, devices=6, timeout=20)
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(password="edge-it-password", workdir=tmp_path / "redis")
    with server:
        yield server


def test_real_devices_train_two_jobs_of_a_population_and_bad_credentials_are_refused(
    tmp_path: Path, store: RedisServer
) -> None:
    x, y = load_dataset("digits")  # type: ignore[arg-type]
    order = np.random.default_rng(0).permutation(len(y))
    slices = np.array_split(order, 6)
    state_dir = tmp_path / "endpoint"
    procs: list[FedfleetProcess] = []
    devices: list[FedfleetProcess] = []

    def state(i: int) -> Path:
        return tmp_path / f"state-{i}"

    def device(i: int, log: str = "") -> FedfleetProcess:
        data = tmp_path / f"device-{i}.npz"
        if not data.exists():
            np.savez(data, x=x[slices[i]], y=y[slices[i]])
        conditions = tmp_path / "conditions.json"
        conditions.write_text(json.dumps({"charging": True, "idle": True, "unmetered": True}))
        endpoint = json.loads((state_dir / "endpoint.json").read_text())
        p = FedfleetProcess(
            [
                "device",
                "run",
                "--server",
                endpoint["url"],
                "--population",
                endpoint["population"],
                "--enroll-token",
                endpoint["enrollToken"],
                "--data",
                str(data),
                "--state",
                str(state(i)),
                "--conditions",
                str(conditions),
            ],
            tmp_path / f"device-{i}{log}.log",
        )
        procs.append(p)
        return p

    def up(name: str) -> FedfleetProcess:
        manifest = _manifest(tmp_path / f"{name}.yaml", name)
        p = FedfleetProcess(
            [
                "up",
                str(manifest),
                "--no-fleet",
                "--state-dir",
                str(state_dir),
                "--store",
                store.url,
                "--quiet",
                "--out",
                str(tmp_path / "runs" / name),
            ],
            tmp_path / f"up-{name}.log",
        )
        procs.append(p)
        return p

    try:
        first = up("edge-first")
        endpoint = wait_for(
            "endpoint.json",
            lambda: (
                (state_dir / "endpoint.json").exists()
                and json.loads((state_dir / "endpoint.json").read_text())
            ),
            120,
            [first],
        )
        assert endpoint["population"] == POPULATION and endpoint["url"].startswith("http://")
        assert set(endpoint) == {"url", "population", "enrollToken"}
        devices = [device(i) for i in range(6)]
        ids = [
            wait_for(f"device {i} enrolled", lambda i=i: identity_of(state(i)), 60, procs)
            for i in range(6)
        ]
        device_ids = [ident["device_id"] for ident in ids]
        assert len(set(device_ids)) == 6, device_ids

        url = endpoint["url"]
        # A checkpoint without a credential, and a forged credential, are refused.
        r = httpx.get(f"{url}/v1/checkpoints/0", timeout=10)
        assert r.status_code == 401, r.text
        genuine = ids[0]["credential"]
        version, payload, sig = genuine.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["sub"] = device_ids[1]  # claim another device's identity with the same signature
        forged_payload = (
            base64.urlsafe_b64encode(json.dumps(claims, sort_keys=True).encode())
            .rstrip(b"=")
            .decode()
        )
        for token, who in (
            (f"{version}.{forged_payload}.{sig}", device_ids[1]),
            (genuine, device_ids[1]),  # a genuine credential for another device id
            (endpoint["enrollToken"], device_ids[0]),  # the enrollment token is no credential
        ):
            r = httpx.post(
                f"{url}/v1/checkin",
                headers={"authorization": f"Bearer {token}", "x-fedfleet-device": who},
                json={
                    "device_id": who,
                    "population": POPULATION,
                    "charging": True,
                    "unmetered": True,
                    "idle": True,
                    "num_examples": 10,
                },
                timeout=10,
            )
            assert r.status_code == 401, (who, r.status_code, r.text)
        r = httpx.get(
            f"{url}/v1/checkpoints/0",
            headers={"authorization": f"Bearer {genuine}", "x-fedfleet-device": device_ids[0]},
            timeout=10,
        )
        assert r.status_code in (200, 404), r.text  # authenticated: no 401 (404 = not yet)

        shop = open_store(store.url)
        try:
            wait_for("round 1 committed", lambda: shop.model_version("edge-first") >= 1, 180, procs)
            # The sixth device restarts mid-job on its state directory: same identity.
            assert devices[5].stop() == 0, devices[5].text()[-2000:]
            assert devices[5].text().count("enrolled as") == 1
            procs.remove(devices[5])
            devices[5] = device(5, "-restarted")
            # A revoked device is refused from its next request on and its process says why.
            shop.revoke_device(POPULATION, device_ids[4], time.time())
            assert devices[4].proc.wait(60) == 3, devices[4].text()[-2000:]
            assert "revoked or expired" in devices[4].text()
            procs.remove(devices[4])
            assert first.proc.wait(600) == 0, first.text()[-4000:]
            assert shop.job_state("edge-first")["phase"] == "Succeeded"
            assert shop.model_version("edge-first") == 5
            again = identity_of(state(5))
            assert again["device_id"] == device_ids[5]
            assert again["credential"] == ids[5]["credential"]  # not enrolled again
            assert devices[5].text().count("enrolled as") == 0
            procs.remove(first)

            # A second job of the population, same state directory: same URL, same devices.
            second = up("edge-second")
            wait_for(
                "second job committed",
                lambda: shop.job_state("edge-second").get("phase") == "Succeeded",
                600,
                procs,
            )
            assert second.proc.wait(120) == 0, second.text()[-4000:]
            assert json.loads((state_dir / "endpoint.json").read_text()) == endpoint
            assert shop.model_version("edge-second") == 5
            # No device but these five exists, so they trained it, on the credentials they
            # got at enrollment for the first job.
            for i in (0, 1, 2, 3, 5):
                now = identity_of(state(i))
                assert now["device_id"] == device_ids[i]
                assert now["population"] == POPULATION
        finally:
            shop.close()
        for i in (0, 1, 2, 3, 5):
            assert devices[i].stop() == 0, devices[i].text()[-2000:]
        # The restarted device worked again on its old credential (it was selected and
        # reported: 3 of 5 devices take part in each round, and a device that reported rests
        # about 10 s, so the others' turns come round within a few rounds).
        assert ": reported" in devices[5].text(), devices[5].text()[-2000:]
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        if os.environ.get("FEDFLEET_KEEP_LOGS"):
            print(tmp_path)
