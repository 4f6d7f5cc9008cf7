"""Whole jobs in one process: the actors, the store and a simulated fleet on real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfleet.core.checkpoint import unpack_checkpoint
from fedfleet.core.spec import FLJob, load_manifest, parse_manifest
from fedfleet.embedded import run_job
from fedfleet.tasks import task_of

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def _job(**spec: object) -> FLJob:
    base: dict[str, object] = {
        "population": "test",
        "model": {"kind": "softmax", "inputs": 64, "classes": 10},
        "rounds": {"total": 10, "goalCount": 10},
        "fleet": {"devices": 100, "dataset": "digits", "shardsPerDevice": 0, "seed": 3},
    }
    base.update(spec)
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "t"},
            "spec": base,
        }
    )


def test_digits_example_reaches_088_in_50_rounds() -> None:
    job = load_manifest((EXAMPLES / "digits.yaml").read_text())
    result = run_job(job)
    assert result.succeeded, result.reason
    committed = [r for r in result.rounds if not r.abandoned]
    assert len(committed) == 50
    assert result.model_version == 50
    assert result.final_accuracy is not None and result.final_accuracy >= 0.88
    # Over-selection: more devices selected than the goal, and rounds close at the goal.
    assert all(r.selected >= 20 for r in committed)
    assert all(r.reported >= 16 for r in committed)
    # Drop-outs happen (8% of selected devices), and are counted.
    assert sum(r.dropped for r in result.rounds) > 0
    weights, _ = unpack_checkpoint(result.model_bytes, task_of(job).shapes)
    assert [w.shape for w in weights] == [(64, 10), (10,)]


def test_model_versions_are_consecutive_and_accuracy_improves() -> None:
    result = run_job(_job())
    committed = [r for r in result.rounds if not r.abandoned]
    assert [r.model_version for r in committed] == list(range(1, 11))
    assert [r.round for r in committed] == list(range(1, 11))
    accs = [r.accuracy for r in committed]
    assert all(a is not None for a in accs)
    assert accs[-1] > accs[0]  # type: ignore[operator]


def test_target_accuracy_ends_the_job_early() -> None:
    result = run_job(_job(rounds={"total": 200, "goalCount": 10, "targetAccuracy": 0.8}))
    assert result.succeeded and result.reason == "target"
    assert result.final_accuracy is not None and result.final_accuracy >= 0.8
    assert result.model_version < 200


def test_rounds_below_the_minimum_are_abandoned_and_rerun() -> None:
    """Half the selected devices drop out; a 100% minimum abandons most attempts, and yet every
    committed round has exactly the goal count and versions never skip."""
    result = run_job(
        _job(
            rounds={"total": 3, "goalCount": 5, "minReportFraction": 1.0, "overSelection": 1.0},
            fleet={
                "devices": 60,
                "dataset": "digits",
                "shardsPerDevice": 0,
                "seed": 1,
                "dropoutRate": 0.5,
            },
        )
    )
    assert result.succeeded
    abandoned = [r for r in result.rounds if r.abandoned]
    committed = [r for r in result.rounds if not r.abandoned]
    assert abandoned, "with 50% drop-out and no over-selection some attempts must fail"
    assert all(r.reason for r in abandoned)
    assert [r.model_version for r in committed] == [1, 2, 3]
    assert all(r.reported >= 5 for r in committed)


@pytest.mark.parametrize("algorithm", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizers_train(algorithm: str) -> None:
    agg = {"algorithm": algorithm, "serverLearningRate": 1.0 if algorithm == "fedavgm" else 0.05}
    result = run_job(_job(aggregation=agg, rounds={"total": 15, "goalCount": 10}))
    assert result.succeeded
    assert result.final_accuracy is not None and result.final_accuracy > 0.6


def test_small_population_still_fills_rounds_by_concentrating_check_ins() -> None:
    """30 devices for rounds of 13: pace steering must bring them back together."""
    result = run_job(
        _job(
            rounds={"total": 5, "goalCount": 10},
            fleet={"devices": 30, "dataset": "digits", "shardsPerDevice": 0, "seed": 2},
        )
    )
    assert result.succeeded
    assert sum(1 for r in result.rounds if r.abandoned) <= 1


def test_active_deadline_ends_the_job_failed_on_the_jobs_clock() -> None:
    # Far more rounds than fit in ten simulated minutes: the deadline, not the rounds, ends it.
    result = run_job(_job(rounds={"total": 1000, "goalCount": 10}, activeDeadlineSeconds=600))
    assert not result.succeeded
    assert result.reason == "deadline-exceeded"
    assert 0 < result.model_version < 1000  # rounds were committed until the deadline
    # Embedded runs keep time on the simulated clock; the coordinator ticks once a second.
    assert 600 <= result.sim_seconds < 600 + 3


def test_the_deadline_counts_from_where_the_coordinator_is_told_it_started() -> None:
    # What the operator does on a resume: the coordinator's clock restarts at active_since,
    # not at the job's first start recorded in the store.
    from fedfleet.coordinator.actor import Coordinator, CoordinatorSettings
    from fedfleet.store.memory import MemoryStore

    job = _job(activeDeadlineSeconds=600)
    store = MemoryStore()
    first = Coordinator(job, store, actor_id="c0")
    first.tick(1000.0)  # the job starts at 1000 (no aggregators yet: no rounds)
    first.step_down()
    resumed = Coordinator(
        job, store, actor_id="c1", settings=CoordinatorSettings(active_since=5000.0)
    )
    resumed.tick(5000.0 + 599)  # 4599 s after the first start, 599 s after the resume
    assert store.job_state(job.key)["phase"] == "Running"
    resumed.tick(5000.0 + 600)
    state = store.job_state(job.key)
    assert (state["phase"], state["reason"]) == ("Failed", "deadline-exceeded")
    assert state["completion_time"] == 5600.0
