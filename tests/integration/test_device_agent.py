"""Real devices end to end: ``fedfleet device run`` processes enroll with a population's token,
train a job of a :class:`LocalDeployment` (real redis-server, real uvicorn actors) on their own
``.npz`` slices of digits, and complete it; one of them is stopped with SIGTERM mid-job and
restarted, and keeps its identity; ``fedfleet device status`` never prints the credential.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedfleet.conformance import CHECKS, Kit, create_app
from fedfleet.core.spec import Dataset, FLJob, ModelSpec, parse_manifest, with_base_dir
from fedfleet.device.agent import CREDENTIAL_REFUSED
from fedfleet.device.datasets import load_dataset, prepare
from fedfleet.device.state import Identity, StateDir
from fedfleet.device.userdata import take
from fedfleet.local import LocalDeployment
from fedfleet.service.enrollment import enroll_token
from tests.uvicorn_thread import serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POPULATION = "edge-boxes"
DEVICES = 3
ROUNDS = 3


def _job(**extra: Any) -> FLJob:
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "real-devices"},
            "spec": {
                "population": POPULATION,
                "model": {"kind": "softmax", "inputs": 64, "classes": 10},
                "plan": {"localEpochs": 1, "batchSize": 10, "learningRate": 0.1},
                "rounds": {
                    "total": ROUNDS,
                    "goalCount": DEVICES,
                    "overSelection": 1.0,
                    "selectionTimeoutSeconds": 30,
                    "reportingTimeoutSeconds": 30,
                },
                "eligibility": {
                    "requireCharging": False,
                    "requireUnmetered": False,
                    "requireIdle": False,
                },
                "fleet": {"devices": DEVICES, "dataset": "digits", "shardsPerDevice": 0},
                **extra,
                "actors": {"selectors": 1, "devicesPerAggregator": DEVICES},
            },
        }
    )


class Device:
    """One ``fedfleet device run`` process and its state directory."""

    def __init__(self, root: Path, index: int, server: str, token: str) -> None:
        self.root = root
        self.state = root / f"state-{index}"
        self.data = root / f"data-{index}.npz"
        self.server = server
        self.token = token
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self, run: int | None = None) -> Path:
        return self.root / f"device-{self.state.name}-{self.runs if run is None else run}.log"

    def start(self, conditions: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.runs += 1
        with self.log().open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "fedfleet.cli", "device", "run"),
                    *("--server", self.server, "--population", POPULATION),
                    *("--enroll-token", self.token, "--data", str(self.data)),
                    *("--state", str(self.state), "--conditions", str(conditions)),
                    *("--recheck-seconds", "1", "--rest-seconds", "0.5", *extra),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def identity(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads((self.state / "identity.json").read_text())
        return value

    def text(self) -> str:
        return "".join(self.log(i).read_text() for i in range(1, self.runs + 1))

    def status(self) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "fedfleet.cli", "device", "status", "--state", str(self.state)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def _fleet(tmp_path: Path, job: FLJob) -> Iterator[tuple[LocalDeployment, list[Device], Path]]:
    secret = os.urandom(32)
    split = prepare(job.spec.fleet)
    conditions = tmp_path / "conditions.json"
    # The machine running the test is busy and may run on battery: the app says it is fine.
    conditions.write_text(json.dumps({"charging": True, "idle": True}))
    with LocalDeployment(
        job, tick_seconds=0.1, lease_ttl=2.0, selectors=1, population_secret=secret
    ) as d:
        server = d.urls("selector")[0]
        devices = [Device(tmp_path, i, server, enroll_token(secret)) for i in range(DEVICES)]
        for i, dev in enumerate(devices):
            fields = take(split.train, split.shards[i])
            np.savez(dev.data, x=fields["x"], y=fields["y"])
        try:
            yield d, devices, conditions
        finally:
            for dev in devices:
                if dev.proc is not None and dev.proc.poll() is None:
                    dev.proc.kill()
                    dev.proc.wait()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[LocalDeployment, list[Device], Path]]:
    with _fleet(tmp_path, _job()) as f:
        yield f


def test_real_devices_enroll_train_survive_restart_and_complete_the_job(
    fleet: tuple[LocalDeployment, list[Device], Path],
) -> None:
    d, devices, conditions = fleet
    name = d.job.key
    for dev in devices:
        dev.start(conditions)
    _wait(lambda: all((dev.state / "identity.json").exists() for dev in devices), 120, "enroll")
    ids = [dev.identity()["device_id"] for dev in devices]
    assert len(set(ids)) == DEVICES
    assert all(i.startswith("d-") for i in ids)

    # Mid-job: the first committed round, then SIGTERM one device (clean exit) and restart it.
    _wait(lambda: d.store.model_version(name) >= 1, 240, "the first committed round")
    victim = devices[0]
    assert victim.stop() == 0
    status = victim.status()
    credential = victim.identity()["credential"]
    assert f"device_id: {ids[0]}" in status
    assert f"population: {POPULATION}" in status
    assert "expires_at" in status
    assert credential not in status
    # Make its credential due for renewal: the restarted device renews it (same device id).
    state = StateDir(victim.state)
    due = Identity.from_dict({**victim.identity(), "renew_after": 0.0})
    state.save_identity(due)
    victim.start(conditions)

    _wait(lambda: d.store.model_version(name) >= ROUNDS, 300, f"{ROUNDS} committed rounds")
    assert victim.identity()["device_id"] == ids[0]  # the restart kept its identity
    second_run = victim.log(2).read_text()
    assert "enrolled as" not in second_run, second_run
    _wait(lambda: "credential renewed" in victim.log(2).read_text(), 60, "the renewal")
    assert victim.identity()["credential"] != credential
    assert victim.identity()["renew_after"] > time.time()
    assert "loaded" not in second_run  # the same data file is not added twice
    assert all("loaded" in dev.log(1).read_text() for dev in devices)
    assert all("enrolled as" in dev.log(1).read_text() for dev in devices)

    # A revoked device is refused at its next check-in and stops with status 3.
    revoked = devices[1]
    d.store.revoke_device(POPULATION, ids[1], time.time())
    assert revoked.proc is not None
    assert revoked.proc.wait(60) == 3, revoked.text()
    assert CREDENTIAL_REFUSED in revoked.text()

    # A forged credential (someone else's, signature altered) is refused the same way.
    forger = Device(devices[2].root, DEVICES, devices[2].server, "")
    forger.data.write_bytes(devices[2].data.read_bytes())
    forged = devices[2].identity()
    forged["credential"] = forged["credential"][:-2] + (
        "AA" if forged["credential"][-2:] != "AA" else "BB"
    )
    forger.state.mkdir(mode=0o700)
    (forger.state / "identity.json").write_text(json.dumps(forged))
    forger.start(conditions)
    assert forger.proc is not None
    assert forger.proc.wait(60) == 3, forger.text()
    assert CREDENTIAL_REFUSED in forger.text()

    # The selector going away (the job's end on a cluster) is not fatal: devices keep trying.
    d.kill("selector-0")
    survivor = devices[2]
    _wait(
        lambda: "Unreachable" in survivor.text() or "ConnectError" in survivor.text(),
        60,
        "a failed check-in",
    )
    assert survivor.proc is not None and survivor.proc.poll() is None
    for dev in (devices[0], devices[2]):
        assert dev.stop() == 0, dev.text()
        assert "reported" in dev.text()
        reported = json.loads((dev.state / "schedule.json").read_text())["reported"]
        assert len(reported) == len(set(reported)) >= 1


def test_real_devices_complete_a_secure_aggregation_job(tmp_path: Path) -> None:
    secure = {"enabled": True, "minGroupSize": DEVICES, "phaseTimeoutSeconds": 20}
    job = _job(aggregation={"secureAggregation": secure})
    with _fleet(tmp_path, job) as (d, devices, conditions):
        for dev in devices:
            dev.start(conditions)
        _wait(lambda: d.store.model_version(d.job.key) >= ROUNDS, 300, "secure rounds")
        for dev in devices:
            assert dev.stop() == 0, dev.text()
            assert "secure aggregation completed" in dev.text(), dev.text()


def test_losing_eligibility_or_a_sigterm_while_selected_aborts_the_task(tmp_path: Path) -> None:
    with _fleet(tmp_path, _job()) as (_, devices, conditions):
        dev = devices[0]  # alone: its round cannot fill, so it waits for its plan
        dev.start(conditions)
        _wait(lambda: "selected for round" in dev.text(), 120, "a selection")
        conditions.write_text(json.dumps({"charging": False, "idle": True}))  # unplugged
        _wait(lambda: "aborted (eligibility-lost: not-charging)" in dev.text(), 60, "an abort")
        assert "abort not delivered" not in dev.text()
        conditions.write_text(json.dumps({"charging": True, "idle": True}))  # plugged in
        _wait(lambda: dev.text().count("selected for round") >= 2, 120, "a new selection")
        assert dev.stop() == 0, dev.text()
        assert "aborted (stopped)" in dev.text(), dev.text()
        assert "reported" not in dev.text()


def test_the_device_agent_passes_the_conformance_kit(tmp_path: Path) -> None:
    """Windows and Retry-After honoured, checkpoint fetched with the credential, one
    well-formed report, a task it cannot understand aborted (the kit plays the server; the
    identity is the kit's device and token, as if enrolled)."""
    device_id, token = "d-" + "c" * 24, "7f" * 32
    kit = Kit(device_id, token, ModelSpec(inputs=64, classes=10))
    with serve(create_app(kit)) as url:
        dev = Device(tmp_path, 0, url, "")
        now = time.time()
        StateDir(dev.state).save_identity(
            Identity(url, POPULATION, device_id, token, now, now + 86400, now + 43200)
        )
        x, y = load_dataset(Dataset.digits)
        np.savez(dev.data, x=x[:40], y=y[:40])
        conditions = tmp_path / "conditions.json"
        conditions.write_text(json.dumps({"charging": True, "idle": True}))
        dev.start(conditions)
        _wait(lambda: kit.done, 120, "the kit's verdicts")
        assert dev.stop() == 0, dev.text()
        results = kit.results()
        assert {r["check"] for r in results} == set(CHECKS)
        failed = [r for r in results if r["passed"] is not True]
        assert not failed, (failed, dev.text())


def test_a_device_runs_only_the_tasks_it_allows(tmp_path: Path) -> None:
    """A job whose task the device was not configured for is refused without importing it;
    with ``--allow-task`` (and the task installed on the device) the same job trains."""
    example = Path(__file__).resolve().parents[2] / "examples" / "custom-numpy"
    raw = yaml.safe_load((example / "fljob.yaml").read_text())
    raw["spec"].update(
        population=POPULATION,
        rounds={"total": 1, "goalCount": 1, "overSelection": 1.0, "minReportFraction": 1.0},
        eligibility={"requireCharging": False, "requireUnmetered": False, "requireIdle": False},
        actors={"selectors": 1},
        evaluation={"data": "data/test.csv", "federated": False},
    )
    job = with_base_dir(parse_manifest(raw), str(example))
    ref = job.spec.effective_task.ref
    with _fleet(tmp_path, job) as (d, devices, conditions):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(40, 8)).astype(np.float32)
        for dev in devices[:2]:
            np.savez(dev.data, x=x, y=x.sum(axis=1))
        refuser, runner = devices[0], devices[1]
        refuser.start(conditions)
        _wait(lambda: "aborted (task-not-allowed)" in refuser.text(), 120, "a refusal")
        assert f"refusing task {ref}" in refuser.text()
        assert d.store.model_version(d.job.key) == 0
        runner.start(conditions, "--allow-task", ref, env={"PYTHONPATH": str(example)})
        _wait(lambda: d.store.model_version(d.job.key) >= 1, 120, "the round")
        assert "reported" in runner.text(), runner.text()
        assert "reported" not in refuser.text()
        for dev in (refuser, runner):
            assert dev.stop() == 0, dev.text()
