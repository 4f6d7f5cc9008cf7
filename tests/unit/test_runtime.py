"""The device runtime: eligibility gate, reconnect windows, plan execution, abort."""

from __future__ import annotations

import numpy as np
import pytest

from fedfleet.core.protocol import Assignment, Reconnect, ReportEnvelope, Task
from fedfleet.core.serde import decode_arrays
from fedfleet.core.spec import EligibilitySpec, FLJobSpec, ModelSpec, PlanSpec, TaskSpec
from fedfleet.device.example_store import ExampleStore
from fedfleet.device.runtime import DeviceConditions, FLRuntime, TaskAborted
from fedfleet.tasks import load_task

pytestmark = pytest.mark.unit

OK = DeviceConditions(charging=True, unmetered=True, idle=True)
MODEL = ModelSpec(kind="softmax", inputs=4, classes=3)
TASK = FLJobSpec(population="pop", model=MODEL, fleet={"devices": 10}).effective_task


def _runtime(tmp_path: object = None, n: int = 30) -> FLRuntime:
    rng = np.random.default_rng(0)
    store = ExampleStore(":memory:", max_examples=1000, ttl_seconds=3600)
    store.add({"x": rng.random((n, 4), dtype=np.float32), "y": rng.integers(0, 3, n)}, now=0.0)
    return FLRuntime("dev-1", "pop", store, policy=EligibilitySpec(), rng=rng)


def _task(evaluate: bool = False, task: TaskSpec = TASK) -> Task:
    return Task(
        Assignment("a1", "agg-0", "t" * 64),
        task,
        PlanSpec(local_epochs=3, batch_size=8, learning_rate=0.1),
        0,
        list(load_task(TASK).initial),
        evaluate=evaluate,
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
    assert isinstance(env, ReportEnvelope)
    update = decode_arrays(env.update, expected_shapes=[(4, 3), (3,)])
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


def test_federated_evaluation_reports_the_global_models_metrics_on_local_data() -> None:
    rt = _runtime()
    env = rt.execute(_task(evaluate=True), now=1.0, still_eligible=lambda epoch: True)
    # the global model is all zeros: uniform predictions, loss ln(3) on every example
    assert env.metrics["federated_loss"] == pytest.approx(np.log(3), rel=1e-5)
    assert {"train_loss", "train_accuracy", "federated_accuracy"} <= set(env.metrics)
    plain = _runtime().execute(_task(), now=1.0, still_eligible=lambda epoch: True)
    assert not any(k.startswith("federated_") for k in plain.metrics)


def test_a_task_the_device_cannot_load_aborts_without_a_report() -> None:
    missing = TaskSpec(ref="no_such_package_xyz.tasks:task")
    with pytest.raises(TaskAborted, match="no_such_package_xyz"):
        _runtime().execute(_task(task=missing), now=1.0, still_eligible=lambda epoch: True)
