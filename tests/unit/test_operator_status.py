"""An FLJob's ``.status`` from the store's records and from its spec: phases, progress,
conditions and their transition times, and where the model is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fedfleet_operator.conditions import (
    COMPLETE,
    INVALID,
    READY,
    SUSPENDED,
    Reason,
    condition,
    find_condition,
    merge_conditions,
    rfc3339,
)
from fedfleet_operator.status import (
    FLJobStatus,
    changed_fields,
    failure_message,
    failure_reason,
    model_location,
    spec_status,
    status_from_store,
    store_unavailable_status,
)

pytestmark = pytest.mark.unit

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
KEY = "team-a/mnist"
STORE = "redis://:s3cret@10.0.0.12:6379/0"
START = T0.timestamp() - 600


def running_state(round_: int = 7, **extra: Any) -> dict[str, Any]:
    return {
        "phase": "Running",
        "rounds": 20,
        "round": round_,
        "model_version": round_,
        "start_time": START,
        "next_attempt": round_ + 2,
        "coordinator": "mnist-coordinator-abc",
        **extra,
    }


def metric(round_: int, accuracy: float = 0.81234567, loss: float = 0.5) -> dict[str, Any]:
    return {
        "round": round_,
        "model_version": round_,
        "accuracy": accuracy,
        "loss": loss,
        "reports": 1000,
        "examples": 31000,
    }


def compute(
    state: dict[str, Any],
    metrics: list[dict[str, Any]],
    *,
    now: datetime = T0,
    previous: FLJobStatus | None = None,
    **kw: Any,
) -> FLJobStatus:
    return status_from_store(
        state,
        metrics,
        key=KEY,
        store_url=STORE,
        generation=3,
        now=now,
        previous=dict(previous) if previous else None,
        rounds_total=kw.pop("rounds_total", 20),
        **kw,
    )


def cond(status: FLJobStatus, type_: str) -> dict[str, Any]:
    found = find_condition(status.get("conditions", []), type_)
    assert found is not None, type_
    return dict(found)


# -- phases ---------------------------------------------------------------------------------------


def test_pending_until_the_coordinator_reports() -> None:
    status = compute({}, [])
    assert status["phase"] == "Pending"
    assert (status["round"], status["rounds"], status["modelVersion"]) == (0, 20, 0)
    assert status["observedGeneration"] == 3
    assert "model" not in status and "startTime" not in status and "accuracy" not in status
    ready = cond(status, READY)
    assert (ready["status"], ready["reason"]) == ("False", Reason.WAITING_FOR_COORDINATOR)
    assert [c["type"] for c in status["conditions"]] == [READY, INVALID, SUSPENDED, COMPLETE]


def test_running_with_round_accuracy_and_last_round() -> None:
    status = compute(running_state(7), [metric(6, 0.7), metric(7)])
    assert status["phase"] == "Running"
    assert (status["round"], status["rounds"], status["modelVersion"]) == (7, 20, 7)
    assert status["accuracy"] == 0.8123
    assert status["lastRound"] == {"round": 7, "accuracy": 0.8123, "loss": 0.5, "reports": 1000}
    assert status["startTime"] == rfc3339(START) == "2025-03-01T11:50:00Z"
    assert "completionTime" not in status
    ready = cond(status, READY)
    assert (ready["status"], ready["reason"]) == ("True", Reason.RUNNING)
    assert "round 7 of 20" in ready["message"]
    assert cond(status, COMPLETE)["status"] == "False"
    assert cond(status, INVALID)["status"] == "False"


def test_metrics_newer_than_the_job_record_win() -> None:
    status = compute(running_state(7), [metric(8, 0.9)])
    assert (status["round"], status["modelVersion"], status["accuracy"]) == (8, 8, 0.9)


def test_last_metrics_of_the_job_record_serve_without_the_history() -> None:
    state = running_state(7, last_metrics=metric(7, 0.75))
    assert compute(state, [])["accuracy"] == 0.75


def test_succeeded_with_completion_time_and_complete_condition() -> None:
    done = T0.timestamp() - 5
    state = running_state(20, phase="Succeeded", reason="rounds", completion_time=done)
    status = compute(state, [metric(20, 0.93)])
    assert status["phase"] == "Succeeded"
    assert status["completionTime"] == rfc3339(done)
    complete = cond(status, COMPLETE)
    assert (complete["status"], complete["reason"]) == ("True", Reason.ROUNDS_COMPLETED)
    assert cond(status, READY)["reason"] == Reason.SUCCEEDED


def test_succeeded_early_on_target_accuracy() -> None:
    state = running_state(9, phase="Succeeded", reason="target", completion_time=START + 60)
    complete = cond(compute(state, [metric(9, 0.95)]), COMPLETE)
    assert (complete["status"], complete["reason"]) == ("True", Reason.TARGET_ACCURACY_REACHED)


def test_failed_on_commit_failures_names_the_reason_and_the_last_error() -> None:
    state = running_state(
        0,
        phase="Failed",
        reason="commit-failures",
        commit_failures=5,
        last_error="ValueError: x must have shape (n, 20), got (359, 64)",
        completion_time=START + 60,
    )
    status = compute(state, [])
    assert status["phase"] == "Failed"
    complete = cond(status, COMPLETE)
    assert (complete["status"], complete["reason"]) == ("False", Reason.COMMIT_FAILURES)
    assert "5 consecutive attempts" in complete["message"]
    assert "got (359, 64)" in complete["message"]
    assert failure_reason(state) == Reason.COMMIT_FAILURES
    assert failure_reason({"phase": "Failed", "reason": "other"}) == Reason.FAILED
    assert failure_message({"reason": "other"}) == "other"


def test_dp_job_shows_epsilon_and_ends_on_its_budget() -> None:
    state = running_state(4, phase="Succeeded", reason="epsilon-budget", completion_time=START)
    private = {**metric(4, 0.8), "epsilon": 1.3012345, "delta": 1e-3, "weight": 20.0}
    del private["examples"]
    status = compute(state, [private])
    assert status["epsilon"] == 1.3012
    assert status["lastRound"]["epsilon"] == 1.3012
    complete = cond(status, COMPLETE)
    assert (complete["status"], complete["reason"]) == ("True", Reason.EPSILON_BUDGET_SPENT)
    assert "after round 4" in complete["message"]


def test_no_epsilon_without_dp() -> None:
    status = compute(running_state(7), [metric(7)])
    assert "epsilon" not in status and "epsilon" not in status["lastRound"]


def test_suspended_unless_finished() -> None:
    status = compute(running_state(7), [metric(7)], suspended=True)
    assert status["phase"] == "Suspended"
    assert cond(status, SUSPENDED)["status"] == "True"
    assert cond(status, READY)["reason"] == Reason.SUSPEND_REQUESTED
    finished = running_state(20, phase="Succeeded", completion_time=START + 60)
    assert compute(finished, [], suspended=True)["phase"] == "Succeeded"


def test_invalid_spec_of_a_job_that_never_ran() -> None:
    status = compute({}, [], invalid="spec: goalCount exceeds devices")
    assert status["phase"] == "Pending"
    invalid = cond(status, INVALID)
    assert (invalid["status"], invalid["reason"]) == ("True", Reason.INVALID_SPEC)
    assert invalid["message"] == "spec: goalCount exceeds devices"
    assert cond(status, READY)["reason"] == Reason.INVALID_SPEC


# -- conditions -----------------------------------------------------------------------------------


def test_conditions_keep_their_transition_time_while_status_holds() -> None:
    first = compute(running_state(7), [metric(7)], now=T0)
    later = T0 + timedelta(minutes=5)
    second = compute(running_state(8), [metric(8)], now=later, previous=first)
    ready1, ready2 = cond(first, READY), cond(second, READY)
    assert ready2["lastTransitionTime"] == ready1["lastTransitionTime"] == rfc3339(T0)
    assert ready2["message"] != ready1["message"]  # round 8 now, same transition
    assert cond(second, COMPLETE)["lastTransitionTime"] == rfc3339(T0)
    done = running_state(20, phase="Succeeded", completion_time=later.timestamp())
    third = compute(done, [metric(20)], now=later, previous=second)
    assert cond(third, COMPLETE)["lastTransitionTime"] == rfc3339(later)
    assert cond(third, READY)["lastTransitionTime"] == rfc3339(later)
    assert cond(third, INVALID)["lastTransitionTime"] == rfc3339(T0)


def test_merge_conditions_keeps_unknown_types_and_orders_known_ones() -> None:
    previous = [
        {
            "type": "Custom",
            "status": "True",
            "reason": "X",
            "message": "",
            "lastTransitionTime": "t",
        },
        {"type": COMPLETE, "status": "False", "reason": "InProgress", "lastTransitionTime": "t0"},
    ]
    merged = merge_conditions(
        previous, [condition(READY, True, "Running"), condition(COMPLETE, False, "Y")], now=T0
    )
    assert [c["type"] for c in merged] == [READY, COMPLETE, "Custom"]
    assert merged[1]["lastTransitionTime"] == "t0" and merged[1]["reason"] == "Y"
    assert merged[0]["lastTransitionTime"] == rfc3339(T0)


def test_store_unavailable_keeps_the_last_status() -> None:
    before = compute(running_state(7), [metric(7)])
    later = T0 + timedelta(seconds=30)
    after = store_unavailable_status(dict(before), "redis at 10.0.0.12:6379 is down", now=later)
    ready = cond(after, READY)
    assert (ready["status"], ready["reason"]) == ("False", Reason.STORE_UNAVAILABLE)
    assert "10.0.0.12" in ready["message"]
    assert ready["lastTransitionTime"] == rfc3339(later)
    for field in ("phase", "round", "accuracy", "lastRound", "model", "startTime"):
        assert after[field] == before[field]
    assert changed_fields(dict(before), dict(after)).keys() == {"conditions"}


# -- the model ------------------------------------------------------------------------------------


def test_model_location_says_where_and_how_to_fetch_without_the_password() -> None:
    status = compute(running_state(7), [metric(7)])
    assert status["model"] == {
        "store": "redis://10.0.0.12:6379/0",
        "key": KEY,
        "version": 7,
        "fetch": "fedfleet fetch-model --store redis://10.0.0.12:6379/0 --job team-a/mnist "
        "-o model.bin",
    }
    assert model_location(KEY, STORE, 1)["version"] == 1
    assert "s3cret" not in repr(status)


# -- from the spec --------------------------------------------------------------------------------


def test_spec_status_of_a_new_job() -> None:
    status = spec_status(None, generation=1, now=T0, rounds_total=20)
    assert (status["phase"], status["round"], status["rounds"]) == ("Pending", 0, 20)
    assert cond(status, INVALID)["status"] == "False"
    assert cond(status, READY)["reason"] == Reason.WAITING_FOR_COORDINATOR


def test_spec_status_of_an_invalid_new_job_stays_pending() -> None:
    status = spec_status({}, generation=1, now=T0, invalid="bad")
    assert status["phase"] == "Pending"
    assert cond(status, INVALID)["message"] == "bad"
    assert cond(status, READY)["reason"] == Reason.INVALID_SPEC


def test_spec_status_of_an_invalid_change_to_a_running_job_keeps_it_running() -> None:
    running = compute(running_state(7), [metric(7)])
    status = spec_status(dict(running), generation=4, now=T0 + timedelta(1), invalid="bad")
    assert status["phase"] == "Running" and status["observedGeneration"] == 4
    assert find_condition(status["conditions"], READY) == cond(running, READY)
    assert cond(status, INVALID)["status"] == "True"


def test_spec_status_suspend_and_resume() -> None:
    running = compute(running_state(7), [metric(7)])
    suspended = spec_status(dict(running), generation=4, now=T0, suspended=True)
    assert suspended["phase"] == "Suspended"
    assert cond(suspended, SUSPENDED)["status"] == "True"
    resumed = spec_status({**running, **suspended}, generation=5, now=T0, suspended=False)
    assert resumed["phase"] == "Pending"
    assert cond(resumed, SUSPENDED)["status"] == "False"


def test_spec_status_never_reopens_a_finished_job() -> None:
    done = {"phase": "Succeeded", "conditions": [], "round": 20}
    assert spec_status(done, generation=9, now=T0, suspended=True)["phase"] == "Succeeded"


def test_changed_fields_is_the_merge_patch() -> None:
    assert changed_fields({"phase": "Running", "round": 1}, {"phase": "Running", "round": 2}) == {
        "round": 2
    }
    assert changed_fields(None, {"phase": "Pending"}) == {"phase": "Pending"}


def test_rfc3339() -> None:
    assert rfc3339(T0) == "2025-03-01T12:00:00Z"
    assert rfc3339(datetime(2025, 3, 1, 12, 0, 0, 999)) == "2025-03-01T12:00:00Z"
    assert rfc3339(0.0) == "1970-01-01T00:00:00Z"
