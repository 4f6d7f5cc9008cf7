"""Real ``fedfleet`` processes for the tests of real devices (integration and cluster tiers).

``fedfleet device run`` and ``fedfleet up --no-fleet`` run as subprocesses with their output in
a log file, read back when an assertion fails; :func:`population_job` is the small digits job
those tests train (eligibility off, one selector, the server evaluating on digits).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedfleet.local import actor_environment

__all__ = ["FedfleetProcess", "identity_of", "population_job", "wait_for"]


class FedfleetProcess:
    """``python -P -m fedfleet.cli ARGS`` with stdout and stderr appended to ``log``."""

    def __init__(self, args: list[str], log: Path, state: Path | None = None) -> None:
        self.args, self.log, self.state = args, log, state
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "fedfleet.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=actor_environment(),
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def identity(self) -> dict[str, Any]:
        """The device's ``identity.json`` in its state directory (empty before enrollment)."""
        assert self.state is not None, "not a device process"
        return identity_of(self.state)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, and the exit status; a process that ignores it fails the test."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"{self.args[:2]} ignored SIGTERM:\n{self.text()[-3000:]}"
            ) from None


def identity_of(state: Path) -> dict[str, Any]:
    path = state / "identity.json"
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return doc


def population_job(
    name: str, population: str, *, total: int, goal: int, devices: int, timeout: float
) -> dict[str, Any]:
    """An FLJob manifest of ``population``: softmax on digits, over-selection 1.0, every
    selected device's report needed, eligibility requirements off, one selector."""
    return {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": name},
        "spec": {
            "population": population,
            "model": {"kind": "softmax", "inputs": 64, "classes": 10},
            "plan": {"localEpochs": 2, "batchSize": 10, "learningRate": 0.1},
            "rounds": {
                "total": total,
                "goalCount": goal,
                "overSelection": 1.0,
                "minReportFraction": 1.0,
                "selectionTimeoutSeconds": timeout,
                "reportingTimeoutSeconds": timeout,
            },
            "eligibility": {
                "requireCharging": False,
                "requireUnmetered": False,
                "requireIdle": False,
            },
            # The server evaluates on the digits test split; the fleet section only names it.
            "fleet": {"devices": devices, "dataset": "digits", "shardsPerDevice": 0, "seed": 1},
            "actors": {"selectors": 1, "devicesPerAggregator": 10},
        },
    }


def wait_for(
    what: str, check: Callable[..., Any], timeout: float, procs: list[FedfleetProcess]
) -> Any:
    """``check()``'s first truthy value within ``timeout`` s; fails with the processes' log
    tails when one of ``procs`` exits meanwhile or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for p in procs:
            if p.proc.poll() is not None:
                raise AssertionError(
                    f"{p.args[:2]} exited {p.proc.returncode} while waiting for {what}:\n"
                    f"{p.text()[-4000:]}"
                )
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.log.name}\n{p.text()[-2000:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")
