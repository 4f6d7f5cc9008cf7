"""The actors' job-level series: what one ended attempt and one job state set, label hygiene.

A real registry, the coordinator's own ``AttemptEnd`` and the in-memory store; the running
actors' ``/metrics`` are checked in tests/integration/test_actor_metrics.py.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from fedfleet.coordinator.actor import AttemptEnd
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.service.telemetry import CoordinatorMetrics, reason_label, timed_store
from fedfleet.store.base import FencedError
from fedfleet.store.memory import MemoryStore

pytestmark = pytest.mark.unit


def _job(dp: bool = False) -> FLJob:
    spec: dict[str, object] = {
        "population": "phones",
        "model": {"kind": "softmax", "inputs": 4, "classes": 2},
    }
    if dp:
        spec["aggregation"] = {"differentialPrivacy": {"enabled": True, "noiseMultiplier": 1.0}}
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "digits", "namespace": "team-a"},
            "spec": spec,
        }
    )


def _end(abandoned: bool, reason: str = "", **kw: object) -> AttemptEnd:
    args: dict[str, object] = {
        "round": 3,
        "attempt": 7,
        "selected": 10,
        "reported": 8,
        "dropped": 2,
        "abandoned": abandoned,
        "reason": reason,
        "opened_at": 100.0,
        "ended_at": 112.5,
        "model_version": 3,
    }
    args.update(kw)
    return AttemptEnd(**args)  # type: ignore[arg-type]


JOB = {"fljob": "digits", "population": "phones"}


def _get(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {**JOB, **labels})


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("", "none"),
        ("too-few-reports", "too-few-reports"),
        ("commit-refused: the new model evaluates to a non-finite loss", "commit-refused"),
        ("no-commit", "no-commit"),
        ("device d-42 said something", "other"),
    ],
)
def test_reason_labels_are_kinds_not_text(reason: str, label: str) -> None:
    assert reason_label(reason) == label


def test_one_ended_attempt_is_counted_everywhere() -> None:
    registry = CollectorRegistry()
    m = CoordinatorMetrics(registry, _job())
    m.attempt_ended(_end(False))
    m.attempt_ended(_end(True, "commit-refused: model norm 1e9 exceeds 10x", selected=4, dropped=1))
    m.attempt_ended(_end(True, "too-few-selected", selected=0, reported=0, dropped=0))

    def attempts(outcome: str, reason: str) -> float | None:
        return _get(registry, "fedfleet_attempts_total", outcome=outcome, reason=reason)

    assert attempts("committed", "none") == 1
    assert attempts("abandoned", "commit-refused") == 1
    assert attempts("abandoned", "too-few-selected") == 1
    assert _get(registry, "fedfleet_commit_errors_total", reason="commit-refused") == 1
    assert _get(registry, "fedfleet_commit_errors_total", reason="no-commit") == 0
    committed = {"outcome": "committed"}
    assert _get(registry, "fedfleet_round_duration_seconds_count", **committed) == 1
    assert _get(registry, "fedfleet_round_duration_seconds_sum", **committed) == 12.5
    assert _get(registry, "fedfleet_round_duration_seconds_count", outcome="abandoned") == 2
    # the last attempt's devices; the counters add every attempt's
    assert _get(registry, "fedfleet_round_selected_devices") == 0
    assert _get(registry, "fedfleet_round_dropout_ratio") == 0.0
    assert _get(registry, "fedfleet_round_devices_total", state="selected") == 14
    assert _get(registry, "fedfleet_round_devices_total", state="dropped") == 3
    m.attempt_ended(_end(False, selected=10, dropped=2))
    assert _get(registry, "fedfleet_round_dropout_ratio") == pytest.approx(0.2)


def test_job_state_sets_the_gauges_and_a_standby_clears_them() -> None:
    registry = CollectorRegistry()
    m = CoordinatorMetrics(registry, _job(dp=True))
    state = {
        "phase": "Running",
        "round": 5,
        "model_version": 5,
        "start_time": 1000.0,
        "last_commit_time": 1500.0,
        "last_metrics": {
            "accuracy": 0.9,
            "loss": 0.3,
            "federated_accuracy": 0.8,
            "epsilon": 1.5,
            "note": "text is ignored",
        },
    }
    m.job_state(state)
    assert _get(registry, "fedfleet_job_model_version") == 5
    assert _get(registry, "fedfleet_job_round") == 5
    assert _get(registry, "fedfleet_job_last_commit_timestamp_seconds") == 1500.0
    assert _get(registry, "fedfleet_job_accuracy", source="server") == 0.9
    assert _get(registry, "fedfleet_job_accuracy", source="federated") == 0.8
    assert _get(registry, "fedfleet_job_loss", source="federated") is None  # not reported
    assert _get(registry, "fedfleet_job_epsilon") == 1.5
    assert _get(registry, "fedfleet_job_phase", phase="Running") == 1
    assert _get(registry, "fedfleet_job_phase", phase="Failed") == 0
    m.job_state({**state, "phase": "Failed"})
    assert _get(registry, "fedfleet_job_phase", phase="Running") == 0
    assert _get(registry, "fedfleet_job_phase", phase="Failed") == 1
    m.job_state(None)
    assert _get(registry, "fedfleet_job_model_version") is None
    assert _get(registry, "fedfleet_job_phase", phase="Failed") is None


def test_before_the_first_commit_the_start_time_counts() -> None:
    registry = CollectorRegistry()
    m = CoordinatorMetrics(registry, _job())
    m.job_state({"phase": "Running", "round": 0, "model_version": 0, "start_time": 1000.0})
    assert _get(registry, "fedfleet_job_last_commit_timestamp_seconds") == 1000.0
    assert _get(registry, "fedfleet_job_accuracy", source="server") is None
    # epsilon only where DP is on, even if a row carries one
    m.job_state({"phase": "Running", "last_metrics": {"epsilon": 2.0}})
    assert _get(registry, "fedfleet_job_epsilon") is None


def test_timed_store_observes_each_call_and_passes_results_and_errors() -> None:
    registry = CollectorRegistry()
    inner = MemoryStore()
    store = timed_store(inner, registry)
    assert store.model_version("team-a/digits") == 0
    assert store.model_version("team-a/digits") == 0
    assert store.jobs() == inner.jobs()
    count = registry.get_sample_value
    assert count("fedfleet_store_seconds_count", {"op": "model_version"}) == 2
    assert count("fedfleet_store_seconds_count", {"op": "jobs"}) == 1
    with pytest.raises(FencedError):  # an error passes through, and the call still counts
        store.record_attempt("team-a/digits", 99, {})
    assert count("fedfleet_store_seconds_count", {"op": "record_attempt"}) == 1
    assert inner.attempts("team-a/digits") == []
