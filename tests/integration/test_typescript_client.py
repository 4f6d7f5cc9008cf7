"""The TypeScript device (clients/typescript), written from the protocol page and the vectors
alone, agrees with the vectors and takes part in a real job.

``bash deploy/dev.sh setup`` installs a pinned tsc and builds the client into
``clients/typescript/dist`` (``FEDFLEET_TS_CLIENT``) before pytest starts; these tests only run
it with node. The job test starts redis-server and the coordinator, selector and aggregator as
real uvicorn processes (:class:`fedfleet.local.LocalDeployment`), mints each device's token the
way the operator would, and runs four node processes with their own slices of digits: two read
JSON files, two the binary array format. Every node process is stopped (SIGTERM, then SIGKILL)
when the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pytest

from fedfleet.core.serde import encode_arrays
from fedfleet.device.datasets import prepare
from fedfleet.local import LocalDeployment
from tests.integration.deployed import small_job

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SOURCES = REPO / "clients" / "typescript" / "src"
VECTORS = REPO / "docs" / "vectors"
HINT = "build it first: bash deploy/dev.sh setup"


@pytest.fixture(scope="module")
def client() -> Path:
    """The built client's dist/ folder; refuses a missing or stale build."""
    node = shutil.which("node")
    assert node is not None, f"node is not on PATH; {HINT}"
    dist = Path(os.environ.get("FEDFLEET_TS_CLIENT") or REPO / "clients" / "typescript" / "dist")
    built = {p.stem: p.stat().st_mtime for p in dist.glob("*.js")}
    for source in SOURCES.glob("*.ts"):
        assert source.stem in built, f"{dist} lacks {source.stem}.js; {HINT}"
        fresh = built[source.stem] >= source.stat().st_mtime
        assert fresh, f"{dist} is older than {source}; {HINT}"
    return dist


def test_the_typescript_client_agrees_with_the_vectors(client: Path) -> None:
    proc = subprocess.run(
        ["node", str(client / "test-vectors.js"), str(VECTORS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-2])
    wire = json.loads((VECTORS / "wire-format.json").read_text())
    # Every case ran: an encode and a decode per valid message, a refusal per invalid one, and
    # the five checks of the device round.
    assert summary["failed"] == 0
    assert summary["passed"] == 2 * len(wire["valid"]) + len(wire["invalid"]) + 5
    assert lines[-1] == f"{summary['passed']} passed, 0 failed"


# -- a real job ---------------------------------------------------------------------------------


class NodeDevice:
    """One ``node dist/device.js`` process and its JSON-lines log."""

    def __init__(self, dist: Path, workdir: Path, name: str, argv: list[str]) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log: TextIO = self.log_path.open("w")
        self.proc = subprocess.Popen(
            ["node", str(dist / "device.js"), *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "raw", "line": line})
        return out

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if it had to be
        killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self._log.close()
                return None
        self._log.close()
        return self.proc.returncode


def _write_data(path: Path, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps({"x": x.astype(float).tolist(), "y": y.astype(int).tolist()}))
    else:
        path.write_bytes(encode_arrays([x.astype(np.float32), y.astype(np.int64)]))


@pytest.fixture
def devices() -> Iterator[list[NodeDevice]]:
    started: list[NodeDevice] = []
    try:
        yield started
    finally:
        for device in started:
            device.stop(timeout=5)


@pytest.mark.timeout(420)
def test_typescript_devices_train_a_real_job(
    client: Path, tmp_path: Path, devices: list[NodeDevice]
) -> None:
    rounds = 3
    job = small_job(
        "ts-client",
        population="ts",
        rounds={
            "total": rounds,
            "goalCount": 3,
            "overSelection": 1.0,
            "minReportFraction": 1.0,
            "selectionTimeoutSeconds": 30,
            "reportingTimeoutSeconds": 60,
        },
        fleet={"devices": 4, "shardsPerDevice": 0, "dropoutRate": 0.0},
        actors={"selectors": 1, "devicesPerAggregator": 3},
    )
    split = prepare(job.spec.fleet)
    with LocalDeployment(
        job, selectors=1, aggregators=1, coordinators=1, tick_seconds=0.1, lease_ttl=2.0
    ) as d:
        selector = d.urls("selector")[0]
        for i in range(4):
            name = f"ts-{i}"
            examples = split.device_examples(i)
            data = tmp_path / (f"{name}.json" if i % 2 == 0 else f"{name}.ffa")
            _write_data(data, examples["x"], examples["y"])
            token = tmp_path / f"{name}.token"
            token.write_text(d.keys.device_token(name))
            argv = [
                "--server", selector, "--device", name, "--token-file", str(token),
                "--population", "ts", "--data", str(data), "--seed", str(i + 1), "--rest", "0.5",
            ]  # fmt: skip
            devices.append(NodeDevice(client, tmp_path, name, argv))
        deadline = time.monotonic() + 300
        phase = ""
        while time.monotonic() < deadline:
            phase = str(d.store.job_state(job.key).get("phase", ""))
            if phase in ("Succeeded", "Failed"):
                break
            assert all(dev.proc.poll() is None for dev in devices), [
                (dev.name, dev.events()[-3:]) for dev in devices
            ]
            time.sleep(0.5)
        history = d.store.metrics(job.key)
        version = d.store.model_version(job.key)
        logs = {dev.name: dev.events() for dev in devices}
        assert phase == "Succeeded", (phase, {n: e[-5:] for n, e in logs.items()})
    statuses = [dev.stop() for dev in devices]

    assert version == rounds
    assert len(history) == rounds
    committed = sum(int(m["reports"]) for m in history)
    assert committed == rounds * 3  # goal count 3, nothing dropped
    reported = [e for events in logs.values() for e in events if e["event"] == "reported"]
    assert len(reported) >= committed
    # Every report trained from a committed version, and the versions advanced.
    assert {int(e["version"]) for e in reported} <= set(range(rounds))
    assert {int(e["version"]) for e in reported} == set(range(rounds))
    # Server-side evaluation on held-out digits: the TypeScript updates improved the model.
    accuracy = [round(float(m["accuracy"]), 3) for m in history]
    print(f"\nTypeScript devices: accuracy by round {accuracy}, {len(reported)} reports")
    assert accuracy[-1] > 0.5, accuracy
    # Nobody crashed or was refused. (Whether a device was ever told to wait depends on the
    # timing of its check-ins against the round's quota, so it is not asserted: a run where
    # every check-in landed in an open round is as correct as one with reconnect windows.)
    events = {e["event"] for events in logs.values() for e in events}
    assert not events & {"crash", "refused", "report-refused", "raw"}, events
    # SIGTERM ends each device cleanly.
    assert statuses == [0, 0, 0, 0], statuses
