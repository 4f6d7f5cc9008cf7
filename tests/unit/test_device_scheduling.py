"""Unit tests of the real device's scheduling rules: backoff bounds and growth, Retry-After
honoured (never sooner), renewal time; and that a device refuses tasks it was not configured
to run without importing them."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfleet.core.spec import BUILTIN_TASK_REF, TaskSpec
from fedfleet.device.agent import BUILTIN_TASKS, DeviceAgent
from fedfleet.device.runtime import ArrayExamples, DeviceConditions, FLRuntime
from fedfleet.device.scheduling import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    backoff_delay,
    renew_due,
    retry_after_delay,
)
from fedfleet.device.state import Identity, StateDir
from fedfleet.tasks import TaskError

pytestmark = pytest.mark.unit


def test_backoff_stays_within_bounds_and_grows() -> None:
    rng = random.Random(1)
    for failures in range(40):
        for _ in range(50):
            d = backoff_delay(failures, rng)
            assert BACKOFF_MIN <= d <= BACKOFF_MAX
    means = [np.mean([backoff_delay(n, rng) for _ in range(400)]) for n in (1, 3, 5, 12)]
    assert means == sorted(means)
    assert means[0] < 2.0 and means[-1] > 0.5 * BACKOFF_MAX


def test_backoff_is_jittered() -> None:
    rng = random.Random(2)
    assert len({round(backoff_delay(6, rng), 6) for _ in range(20)}) > 10


def test_retry_after_is_never_shortened_and_falls_back_to_backoff() -> None:
    rng = random.Random(3)
    for _ in range(200):
        d = retry_after_delay(7.0, 1, rng)
        assert 7.0 <= d <= 7.0 * 1.2
    for bad in (None, float("nan"), -1.0):
        assert BACKOFF_MIN <= retry_after_delay(bad, 1, rng) <= 2 * BACKOFF_MIN


def test_renew_after_half_life() -> None:
    ident = Identity("http://s", "p", "d-" + "0" * 24, "v1.a.b", 0.0, 100.0, 50.0)
    assert not renew_due(ident, 49.9)
    assert renew_due(ident, 50.0)


def _agent(tmp_path: Path, allowed: frozenset[str] = BUILTIN_TASKS) -> DeviceAgent:
    return DeviceAgent(
        "http://127.0.0.1:9",
        "pop",
        StateDir(tmp_path),
        ArrayExamples({"x": np.zeros((1, 64), np.float32), "y": np.zeros(1, np.int64)}),
        conditions=lambda busy=False: DeviceConditions(True, True, True),
        allowed_tasks=allowed,
    )


def test_unlisted_task_is_refused_before_any_import(tmp_path: Path) -> None:
    module = tmp_path / "evil_task_module.py"
    module.write_text("raise SystemExit('imported!')\n")
    agent = _agent(tmp_path / "state")
    spec = TaskSpec(ref="evil_task_module:task", path=str(tmp_path))
    with pytest.raises(TaskError, match="not allowed"):
        agent._load_task(spec)
    assert "evil_task_module" not in sys.modules
    assert str(tmp_path) not in sys.path


def test_allowed_tasks_load_without_the_servers_path(tmp_path: Path) -> None:
    agent = _agent(tmp_path / "state", BUILTIN_TASKS | {"elsewhere_mod:task"})
    loaded = agent._load_task(
        TaskSpec(ref=BUILTIN_TASK_REF, config={"inputs": 64, "classes": 10}, path="/nowhere")
    )
    assert loaded.shapes == [(64, 10), (10,)]
    (tmp_path / "elsewhere_mod.py").write_text("raise SystemExit('imported from path!')\n")
    with pytest.raises(TaskError, match="cannot import"):  # allowed, but not installed
        agent._load_task(TaskSpec(ref="elsewhere_mod:task", path=str(tmp_path)))
    assert str(tmp_path) not in sys.path


def test_losing_eligibility_or_a_stop_mid_task_says_no_with_the_reason(tmp_path: Path) -> None:
    now = {"charging": True}
    calls: list[bool] = []

    def conditions(busy: bool = False) -> DeviceConditions:
        calls.append(busy)
        return DeviceConditions(charging=now["charging"], unmetered=True, idle=True)

    agent = DeviceAgent(
        "http://127.0.0.1:9",
        "pop",
        StateDir(tmp_path),
        ArrayExamples({"x": np.zeros((2, 64), np.float32), "y": np.zeros(2, np.int64)}),
        conditions=conditions,
    )
    agent._runtime = FLRuntime(
        "d-1", "pop", agent.examples, policy=agent.policy, rng=np.random.default_rng(0)
    )
    assert agent._eligible(0) is True
    assert calls == [True]  # asked as a busy device: its own training load is allowed for
    now["charging"] = False
    assert agent._eligible(1) is False
    assert agent._abort_reason == "eligibility-lost: not-charging"
    now["charging"] = True
    agent._stop.set()
    assert agent._eligible(2) is False
    assert agent._abort_reason == "stopped"
