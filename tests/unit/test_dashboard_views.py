"""What the dashboard and ``fedfleet report`` make of the store's records (pure functions).

The memory store here is the real reference implementation of the store, not a fake: the
views and the report read it through the same methods they call on Redis.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedfleet.dashboard.report_cmd import result_from_store
from fedfleet.dashboard.views import (
    attempt_row,
    job_detail,
    job_summary,
    list_jobs,
    numeric_metrics,
    redact_store_url,
)
from fedfleet.results import RoundRecord
from fedfleet.store.memory import MemoryStore

pytestmark = pytest.mark.unit

JOB = "team-a/digits"


def _attempt(round_: int, *, abandoned: bool = False, **extra: Any) -> dict[str, Any]:
    metrics = {} if abandoned else {"accuracy": 0.5 + round_ / 100, "loss": 1.0 / round_}
    return {
        "round": round_,
        "attempt": round_,
        "selected": 13,
        "reported": 0 if abandoned else 10,
        "dropped": 1,
        "abandoned": abandoned,
        "reason": "too-few-reports" if abandoned else "",
        "opened_at": 100.0 * round_,
        "ended_at": 100.0 * round_ + 7.5,
        "model_version": round_ - abandoned,
        "metrics": metrics,
        **extra,
    }


def _store_with_a_job(*, epsilon: bool = False) -> MemoryStore:
    store = MemoryStore(clock=lambda: 1000.0)
    token = store.acquire_lease(JOB, "c0", ttl=60.0)
    assert token is not None
    for r in (1, 2):
        metrics = {"accuracy": 0.5 + r / 100, "loss": 1.0 / r, "reports": 10}
        if epsilon:
            metrics |= {"epsilon": 0.7 * r, "delta": 1e-5}
        store.commit_checkpoint(JOB, token, r - 1, r, b"model", metrics)
        store.record_attempt(JOB, token, _attempt(r, metrics=store.metrics(JOB)[-1], reason=""))
        if r == 1:
            store.record_attempt(JOB, token, _attempt(2, abandoned=True))
    store.record_attempt(JOB, token, _attempt(3, abandoned=True, reason="job-finished"))
    store.put_job_state(
        JOB,
        token,
        {
            "phase": "Succeeded",
            "reason": "rounds",
            "round": 2,
            "rounds": 2,
            "model_version": 2,
            "start_time": 50.0,
            "completion_time": 350.0,
            "last_metrics": store.metrics(JOB)[-1],
        },
    )
    return store


# -- metrics pass through generically --------------------------------------------------------


def test_numeric_metrics_flattens_and_keeps_only_finite_numbers() -> None:
    row = {
        "round": 3,
        "model_version": 3,
        "accuracy": 0.91,
        "reports": 8,
        "device": {"loss": 0.2, "accuracy": 0.8, "name": "x", "deep": {"a": {"b": {"c": 1}}}},
        "federated_eval": {"accuracy": 0.88},
        "flag": True,
        "nan": math.nan,
        "inf": math.inf,
        "text": "0.5",
        "none": None,
    }
    assert numeric_metrics(row) == {
        "accuracy": 0.91,
        "reports": 8.0,
        "device.loss": 0.2,
        "device.accuracy": 0.8,
        "federated_eval.accuracy": 0.88,
    }


def test_numeric_metrics_is_bounded() -> None:
    row = {f"k{i}": float(i) for i in range(500)} | {"x" * 200: 1.0}
    out = numeric_metrics(row)
    assert len(out) == 64 and all(len(k) <= 80 for k in out)


# -- rows and summaries -------------------------------------------------------------------------


def test_a_malformed_job_record_shows_as_missing_values() -> None:
    summary = job_summary(JOB, {"phase": None, "round": "three", "last_metrics": "oops"})
    assert summary["phase"] == "Unknown"
    assert summary["round"] == 0
    assert summary["accuracy"] is None and summary["rounds"] is None


def test_attempt_row_has_participants_outcome_and_duration() -> None:
    row = attempt_row(_attempt(4))
    assert (row["selected"], row["reported"], row["dropped"]) == (13, 10, 1)
    assert row["seconds"] == 7.5
    assert row["metrics"] == {"accuracy": 0.54, "loss": 0.25}
    assert attempt_row({"round": 1})["seconds"] is None


def test_jobs_and_detail_from_the_store() -> None:
    store = _store_with_a_job()
    [summary] = list_jobs(store)
    assert summary["key"] == JOB and summary["phase"] == "Succeeded"
    assert (summary["round"], summary["rounds"], summary["accuracy"]) == (2, 2, 0.52)
    detail = job_detail(store, JOB)
    assert detail is not None
    assert [(a["round"], a["abandoned"]) for a in detail["attempts"]] == [
        (1, False),
        (2, True),
        (2, False),
    ]  # the attempt cut short by the job's end is not shown...
    assert detail["next"] == 4  # ...but counted, so it is never fetched again
    later = job_detail(store, JOB, detail["next"])
    assert later is not None and later["attempts"] == [] and later["next"] == 4
    assert job_detail(store, "team-a/nothing") is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@10.0.0.1:6379/0", "redis://10.0.0.1:6379/0"),
        ("rediss://user:s3cret@redis.example:6380/2", "rediss://redis.example:6380/2"),
        ("redis://redis:6379/0?password=s3cret", "redis://redis:6379/0"),
        ("redis://:s3cret@[::1]:6379/0", "redis://[::1]:6379/0"),
        ("unix://:s3cret@/run/redis.sock?db=1", "unix:///run/redis.sock"),
        ("redis://:s3cret@host:notaport/0", "redis://host/0"),
        ("memory://", "memory://"),
    ],
)
def test_store_urls_are_shown_without_credentials(url: str, shown: str) -> None:
    assert redact_store_url(url) == shown
    assert "s3cret" not in redact_store_url(url)


# -- the report of a job from its store ---------------------------------------------------------


def test_result_from_store_rebuilds_the_report() -> None:
    result = result_from_store(_store_with_a_job(epsilon=True), JOB)
    assert result is not None
    assert [(r.round, r.abandoned) for r in result.rounds] == [(1, False), (2, True), (2, False)]
    first = result.rounds[0]
    assert first == RoundRecord(
        round=1,
        selected=13,
        reported=10,
        dropped=1,
        abandoned=False,
        accuracy=0.51,
        loss=1.0,
        seconds=7.5,
        sim_seconds=7.5,
        model_version=1,
        reason="",
        epsilon=0.7,
    )
    assert result.rounds[1].reason == "too-few-reports"
    assert (result.succeeded, result.reason, result.model_version) == (True, "rounds", 2)
    assert (result.final_accuracy, result.final_loss) == (0.52, 0.5)
    assert (result.epsilon, result.delta) == (1.4, 1e-5)
    assert result.wall_seconds == 300.0
    totals = result.to_report()["totals"]
    assert (totals["rounds"], totals["attempts"], totals["abandoned"]) == (2, 3, 1)


def test_result_of_a_running_job_is_as_of_now() -> None:
    store = MemoryStore()
    token = store.acquire_lease(JOB, "c0", ttl=60.0)
    assert token is not None
    store.put_job_state(JOB, token, {"phase": "Running", "start_time": 10.0})
    result = result_from_store(store, JOB, now=70.0)
    assert result is not None
    assert (result.succeeded, result.reason, result.wall_seconds) == (False, "", 60.0)
    assert result.rounds == [] and result.final_accuracy is None
    assert result_from_store(store, "team-a/other") is None
