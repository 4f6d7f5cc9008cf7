"""The conformance kit (``fedfleet conformance``) judges device clients, and can fail them.

The kit runs as a real uvicorn server; the TypeScript device (node) must pass every check, and
a deliberately careless client written here (real HTTP, httpx) must fail the checks it breaks.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fedfleet.conformance import CHECKS, Kit, create_app
from fedfleet.core.serde import encode_arrays
from fedfleet.core.spec import Dataset, ModelSpec
from fedfleet.device.datasets import load_dataset
from tests.integration.test_typescript_client import client  # noqa: F401  (fixture)
from tests.uvicorn_thread import serve

pytestmark = pytest.mark.integration

DEVICE = "conformance-1"
TOKEN = "7f" * 32


@pytest.fixture
def kit() -> Iterator[tuple[Kit, str]]:
    kit = Kit(DEVICE, TOKEN, ModelSpec(inputs=64, classes=10))
    with serve(create_app(kit)) as url:
        yield kit, url


def _verdicts(url: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{url}/conformance", timeout=10).json()
    return doc


def _wait_done(url: str, limit: float) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        doc = _verdicts(url)
        if doc["done"]:
            return doc
        time.sleep(0.2)
    return _verdicts(url)


@pytest.mark.timeout(180)
def test_the_typescript_client_conforms(
    kit: tuple[Kit, str],
    client: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    _, url = kit
    x, y = load_dataset(Dataset.digits)
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"x": x[:40].tolist(), "y": y[:40].tolist()}))
    log = (tmp_path / "device.log").open("w")
    proc = subprocess.Popen(
        ["node", str(client / "device.js"), "--server", url, "--device", DEVICE,
         "--token", TOKEN, "--population", "any", "--data", str(data), "--rest", "0.2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        doc = _wait_done(url, 120)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            status = None
        log.close()
    checks = {c["check"]: c for c in doc["checks"]}
    assert set(checks) == set(CHECKS)
    failed = {n: c for n, c in checks.items() if c["passed"] is not True}
    assert doc["done"] and not failed, (failed, (tmp_path / "device.log").read_text()[-3000:])
    assert status == 0  # SIGTERM during a one-hour window ends the device cleanly


@pytest.mark.timeout(120)
def test_a_careless_client_fails_the_checks_it_breaks(kit: tuple[Kit, str]) -> None:
    the_kit, url = kit
    auth = {"authorization": f"Bearer {TOKEN}", "x-fedfleet-device": DEVICE}
    body = {"device_id": DEVICE, "population": "any", "charging": True, "unmetered": True,
            "idle": True, "num_examples": 5}  # fmt: skip
    with httpx.Client(base_url=url, timeout=10) as http:
        window = http.post("/v1/checkin", json=body, headers=auth).json()
        assert window["outcome"] == "reconnect" and window["reconnect_after_s"] > 0
        busy = http.post("/v1/checkin", json=body, headers=auth)  # ignores the window
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) > 0
        chosen = http.post("/v1/checkin", json=body, headers=auth).json()  # ignores Retry-After
        assert chosen["outcome"] == "selected"
        ticket = {"x-fedfleet-ticket": chosen["ticket"]}
        poll = {"device_id": DEVICE, "wait": "1"}
        assert (
            http.get(f"/v1/tasks/{chosen['round_key']}", params=poll, headers=ticket).status_code
            == 202
        )
        task = http.get(f"/v1/tasks/{chosen['round_key']}", params=poll, headers=ticket).json()
        assert http.get(task["checkpoint_url"]).status_code == 401  # no token
        zeros = encode_arrays([np.zeros((64, 10), np.float32), np.zeros(10, np.float32)])
        report = {**ticket, "x-fedfleet-device": DEVICE, "x-fedfleet-examples": "5",
                  "x-fedfleet-aggregator": task["aggregator"],
                  "content-type": "application/octet-stream"}  # fmt: skip
        assert (
            http.post(
                f"/v1/reports/{chosen['round_key']}", content=zeros, headers=report
            ).status_code
            == 422
        )
        assert (
            http.post(
                f"/v1/reports/{chosen['round_key']}", content=zeros, headers=report
            ).status_code
            == 409
        )
        second = http.post("/v1/checkin", json=body, headers=auth).json()
        ticket2 = {**report, "x-fedfleet-ticket": second["ticket"]}
        http.post(f"/v1/reports/{second['round_key']}", content=zeros, headers=ticket2)
        http.post("/v1/checkin", json=body, headers=auth)  # the final window
        http.post("/v1/checkin", json=body, headers=auth)  # ... ignored
    checks = {c["check"]: c["passed"] for c in the_kit.results()}
    assert checks == {
        "authenticates": True,
        "window-honoured": False,
        "retry-after-honoured": False,
        "polls-until-configured": True,
        "checkpoint-authenticated": False,
        "report-well-formed": False,
        "exactly-once": False,
        "refuses-unknown-privacy": False,
        "final-window-honoured": False,
    }
