"""An FLJob's ``.status`` from the store's records and from its spec: phases, progress,
conditions and their transition times, and where the model is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fedfleet_operator.conditions import (
    COMPLETE,
    FAILED,
    INVALID,
    READY,
    SUSPENDED,
    Reason,
    condition,
    current_type,
    failure_reason,
    find_condition,
    merge_conditions,
    rfc3339,
)
from fedfleet_operator.lifetime import (
    deadline_at,
    parse_time,
    past_deadline,
    ttl_expired,
    ttl_expires_at,
)
from fedfleet_operator.status import (
    FLJobStatus,
    active_since,
    changed_fields,
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
    # Ready last: nothing is True, and Ready's reason says what the job waits for.
    assert [c["type"] for c in status["conditions"]] == [
        INVALID,
        SUSPENDED,
        COMPLETE,
        FAILED,
        READY,
    ]


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
    complete, failed = cond(status, COMPLETE), cond(status, FAILED)
    assert (complete["status"], complete["reason"]) == ("False", Reason.FAILED)
    assert (failed["status"], failed["reason"]) == ("True", Reason.COMMIT_FAILURES)
    assert "5 consecutive attempts" in failed["message"]
    assert "got (359, 64)" in failed["message"]


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
    assert cond(status, READY)["reason"] == Reason.SUSPENDED
    assert status["conditions"][-1]["type"] == SUSPENDED
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
    # Known types in order, unknown ones after, and the current state (Ready=True) last.
    assert [c["type"] for c in merged] == [COMPLETE, "Custom", READY]
    assert merged[0]["lastTransitionTime"] == "t0" and merged[0]["reason"] == "Y"
    assert merged[-1]["lastTransitionTime"] == rfc3339(T0)


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
        "fetch": "fedfleet fetch-model --store redis://10.0.0.12:6379/0 --store-secret "
        "team-a/mnist-secret --job team-a/mnist -o model.safetensors",
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


# -- lifetime: failure reasons, the deadline's clock, the TTL -------------------------------------


def test_failure_reasons_map_to_named_constants() -> None:
    assert failure_reason("deadline-exceeded") == Reason.DEADLINE_EXCEEDED
    assert failure_reason("DeadlineExceeded") == Reason.DEADLINE_EXCEEDED
    assert failure_reason("commit-failures") == Reason.COMMIT_FAILURES
    assert failure_reason("CommitFailures") == Reason.COMMIT_FAILURES
    assert failure_reason("disk on fire") == Reason.JOB_FAILED
    assert failure_reason(None) == Reason.JOB_FAILED


def test_a_failed_job_has_failed_true_and_complete_false() -> None:
    status = compute(running_state(3, phase="Failed", reason="deadline-exceeded"), [metric(3)])
    assert status["phase"] == "Failed"
    failed, complete = cond(status, FAILED), cond(status, COMPLETE)
    assert (failed["status"], failed["reason"]) == ("True", Reason.DEADLINE_EXCEEDED)
    assert "after 3 rounds" in failed["message"]
    assert (complete["status"], complete["reason"]) == ("False", Reason.FAILED)
    assert status["conditions"][-1] == failed  # the State column shows DeadlineExceeded


def test_the_current_condition_goes_last() -> None:
    def c(type_: str, status: str) -> dict[str, str]:
        return {"type": type_, "status": status}

    assert current_type([c(READY, "True"), c(SUSPENDED, "False")]) == READY
    assert current_type([c(READY, "False"), c(SUSPENDED, "True")]) == SUSPENDED
    assert current_type([c(READY, "True"), c(INVALID, "True")]) == INVALID
    assert current_type([c(INVALID, "True"), c(COMPLETE, "True")]) == COMPLETE
    assert current_type([c(READY, "False"), c(COMPLETE, "False")]) == READY
    assert current_type([]) is None


def test_active_since_starts_at_creation_and_restarts_on_resume() -> None:
    later = T0 + timedelta(minutes=7)
    assert active_since({}, suspended=False, now=T0) == rfc3339(T0)
    assert active_since({}, suspended=True, now=T0) == ""  # created suspended: not started
    running = {"phase": "Running", "startTime": rfc3339(T0)}
    assert active_since(running, suspended=False, now=later) == rfc3339(T0)
    assert active_since(running, suspended=True, now=later) == rfc3339(T0)
    suspended = {"phase": "Suspended", "startTime": rfc3339(T0)}
    assert active_since(suspended, suspended=False, now=later) == rfc3339(later)
    finished = {"phase": "Succeeded", "startTime": rfc3339(T0)}
    assert active_since(finished, suspended=False, now=later) == rfc3339(T0)


def test_deadline_and_ttl_are_read_from_spec_and_status() -> None:
    spec = {"activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 30}
    running = {"phase": "Running", "startTime": rfc3339(T0)}
    assert deadline_at(spec, running) == T0 + timedelta(seconds=60)
    assert not past_deadline(spec, running, T0 + timedelta(seconds=59))
    assert past_deadline(spec, running, T0 + timedelta(seconds=60))
    assert deadline_at({**spec, "suspend": True}, running) is None  # the clock is stopped
    assert deadline_at(spec, {**running, "phase": "Suspended"}) is None
    assert deadline_at({}, running) is None
    assert ttl_expires_at(spec, running) is None  # not finished
    done = {"phase": "Failed", "completionTime": rfc3339(T0)}
    assert ttl_expires_at(spec, done) == T0 + timedelta(seconds=30)
    assert ttl_expired(spec, done, T0 + timedelta(seconds=30))
    # No completionTime: the TTL counts from the Complete/Failed transition.
    by_condition = {
        "phase": "Succeeded",
        "conditions": [
            {"type": COMPLETE, "status": "True", "lastTransitionTime": rfc3339(T0)},
        ],
    }
    assert ttl_expires_at(spec, by_condition) == T0 + timedelta(seconds=30)
    assert parse_time("not a time") is None
