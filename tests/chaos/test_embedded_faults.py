"""Actors crashing mid-job in the embedded runner: jobs finish, committed models survive."""

from __future__ import annotations

import pytest

from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.embedded import EmbeddedOptions, Fault, run_job

pytestmark = pytest.mark.slow


def _job(aggregators: int = 1) -> FLJob:
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "chaos"},
            "spec": {
                "population": "chaos",
                "rounds": {"total": 12, "goalCount": 10},
                "fleet": {"devices": 100, "dataset": "digits", "shardsPerDevice": 0, "seed": 5},
                "actors": {"selectors": 2, "devicesPerAggregator": 7},
            },
        }
    )


def test_coordinator_crash_standby_takes_over_and_versions_never_go_back() -> None:
    result = run_job(
        _job(), options=EmbeddedOptions(faults=[Fault(at=150.0, actor="coordinator-0")])
    )
    assert result.succeeded
    committed = [r for r in result.rounds if not r.abandoned]
    versions = [r.model_version for r in committed]
    assert versions == sorted(versions) and versions[-1] == 12
    assert len(set(versions)) == len(versions)
    assert any(r.reason == "coordinator-failover" for r in result.rounds)


def test_selector_crash_loses_its_devices_but_rounds_complete() -> None:
    result = run_job(_job(), options=EmbeddedOptions(faults=[Fault(at=120.0, actor="selector-0")]))
    assert result.succeeded
    assert result.model_version == 12


def test_aggregator_crash_round_completes_or_is_rerun() -> None:
    job = _job()
    assert job.spec.actors.aggregator_count(job.spec.rounds) == 2
    result = run_job(job, options=EmbeddedOptions(faults=[Fault(at=130.0, actor="aggregator-1")]))
    assert result.succeeded
    assert result.model_version == 12


def _secure_job() -> FLJob:
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "chaos-private"},
            "spec": {
                "population": "chaos",
                "rounds": {"total": 8, "goalCount": 20},
                "aggregation": {
                    "exampleWeightCap": 10,
                    "secureAggregation": {"enabled": True, "minGroupSize": 5},
                    "differentialPrivacy": {"enabled": True, "noiseMultiplier": 1.0},
                },
                "fleet": {"devices": 100, "dataset": "digits", "shardsPerDevice": 0, "seed": 5},
                "actors": {"selectors": 2, "devicesPerAggregator": 13},
            },
        }
    )


@pytest.mark.parametrize("actor", ["aggregator-1", "coordinator-0"])
def test_secure_aggregation_survives_an_actor_crash(actor: str) -> None:
    """An aggregator's sessions die with it (its groups' rounds are re-run); a new coordinator
    abandons the attempt in flight. Either way every committed version is new and the job's
    epsilon only counts committed rounds."""
    job = _secure_job()
    assert job.spec.actors.aggregator_count(job.spec.rounds) == 2
    result = run_job(job, options=EmbeddedOptions(faults=[Fault(at=130.0, actor=actor)]))
    assert result.succeeded and result.model_version == 8
    committed = [r for r in result.rounds if not r.abandoned]
    assert [r.model_version for r in committed] == list(range(1, 9))
    epsilons = [r.epsilon for r in committed]
    assert all(e is not None for e in epsilons) and epsilons == sorted(epsilons)
