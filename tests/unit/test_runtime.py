"""The device runtime: eligibility gate, reconnect windows, plan execution, abort."""

from __future__ import annotations

import numpy as np
import pytest

from fedfleet.core.models import init_weights, weight_shapes
from fedfleet.core.protocol import Assignment, Reconnect, Task
from fedfleet.core.serde import decode_arrays
from fedfleet.core.spec import EligibilitySpec, ModelSpec, PlanSpec
from fedfleet.device.example_store import ExampleStore
from fedfleet.device.runtime import DeviceConditions, FLRuntime, TaskAborted

pytestmark = pytest.mark.unit

OK = DeviceConditions(charging=True, unmetered=True, idle=True)
MODEL = ModelSpec(kind="softmax", inputs=4, classes=3)


def _runtime(tmp_path: object = None, n: int = 30) -> FLRuntime:
    rng = np.random.default_rng(0)
    store = ExampleStore(":memory:", max_examples=1000, ttl_seconds=3600)
    store.add(rng.random((n, 4), dtype=np.float32), rng.integers(0, 3, n), now=0.0)
    return FLRuntime("dev-1", "pop", store, policy=EligibilitySpec(), rng=rng)


def _task() -> Task:
    return Task(
        Assignment("a1", "agg-0", "t" * 64),
        MODEL,
        PlanSpec(local_epochs=3, batch_size=8, learning_rate=0.1),
        0,
        init_weights(MODEL),
    )


def test_gate_requires_eligibility_and_the_reconnect_window() -> None:
    rt = _runtime()
    assert rt.should_check_in(OK, now=1.0)
    assert not rt.should_check_in(DeviceConditions(False, True, True), now=1.0)
    assert not rt.should_check_in(DeviceConditions(True, True, False), now=1.0)
    t = rt.on_reconnect(Reconnect(100.0, 200.0))
    assert 100.0 <= t <= 200.0
    assert not rt.should_check_in(OK, now=99.0)
    assert rt.should_check_in(OK, now=t)


def test_reconnect_picks_spread_over_the_window() -> None:
    rt = _runtime()
    picks = [rt.on_reconnect(Reconnect(0.0, 1000.0)) for _ in range(2000)]
    hist, _ = np.histogram(picks, bins=10, range=(0, 1000))
    assert hist.min() > 150  # roughly uniform: 200 expected per bin


def test_no_examples_means_not_eligible() -> None:
    rt = _runtime(n=0)
    assert rt.ineligible_because(OK, now=1.0) == "too-few-examples"


def test_expired_examples_stop_counting() -> None:
    rt = _runtime()
    assert rt.should_check_in(OK, now=10.0)
    assert not rt.should_check_in(OK, now=3601.0)


def test_execute_reports_an_encoded_delta_of_the_model_shape() -> None:
    rt = _runtime()
    env = rt.execute(_task(), now=1.0, still_eligible=lambda epoch: True)
    update = decode_arrays(env.update, expected_shapes=weight_shapes(MODEL))
    assert env.num_examples == 30
    assert env.round_key == "a1" and env.device_id == "dev-1"
    assert any(np.abs(u).sum() > 0 for u in update)
    assert 0.0 <= env.metrics["train_accuracy"] <= 1.0


def test_lost_eligibility_mid_task_aborts_without_a_report() -> None:
    rt = _runtime()
    asked: list[int] = []

    def unplugged_after_first_epoch(epoch: int) -> bool:
        asked.append(epoch)
        return epoch < 1

    with pytest.raises(TaskAborted):
        rt.execute(_task(), now=1.0, still_eligible=unplugged_after_first_epoch)
    assert asked == [0, 0, 1]  # checked before training and before each epoch; stopped at 2nd


def test_lost_eligibility_before_training_aborts() -> None:
    with pytest.raises(TaskAborted):
        _runtime().execute(_task(), now=1.0, still_eligible=lambda epoch: False)
