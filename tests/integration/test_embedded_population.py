"""Embedded: a second job of a population is trained by the same simulated devices.

``EmbeddedPopulation`` keeps one population's devices (and the simulated clock and store they
live on) across jobs, as a deployment keeps its enrolled devices across FLJobs. Two jobs run on
it one after the other; the second one starts from its own initial model, is trained by the
very devices that trained the first (no other fleet exists), and both commit every round.
"""

from __future__ import annotations

from typing import Any

import pytest

from fedfleet.core.spec import FLJob
from fedfleet.embedded import EmbeddedOptions, EmbeddedPopulation, run_job
from tests.integration.deployed import small_job


def _job(name: str, **overrides: Any) -> FLJob:
    # Simulated time: training takes trainSeconds of it, so the timeouts must cover that.
    fleet = {"dropoutRate": 0.0, "trainSeconds": 5, **overrides.pop("fleet", {})}
    rounds = {
        "total": 5,
        "goalCount": 8,
        "selectionTimeoutSeconds": 60,
        "reportingTimeoutSeconds": 60,
    }
    return small_job(name, rounds=rounds, fleet=fleet, **overrides)


def test_two_jobs_of_a_population_run_on_the_same_devices_one_after_the_other() -> None:
    first, second = _job("pop-first"), _job("pop-second")
    population = EmbeddedPopulation.of(first)
    devices = list(population.fleet.devices)
    options = EmbeddedOptions(population=population)

    a = run_job(first, options=options)
    assert a.succeeded and a.model_version == 5, a.error
    reported_after_a = population.fleet.stats.reported
    assert reported_after_a >= 5 * 8
    clock_after_a = population.loop.now

    b = run_job(second, options=options)
    assert b.succeeded and b.model_version == 5, b.error
    assert [r.model_version for r in b.rounds if not r.abandoned] == [1, 2, 3, 4, 5]
    # The same devices (objects, ids, examples), on the same clock, trained the second job.
    assert population.fleet.devices == devices
    assert population.fleet.stats.reported >= reported_after_a + 5 * 8
    assert population.loop.now > clock_after_a
    assert population.jobs == [first.key, second.key]
    assert b.final_accuracy is not None and b.final_accuracy > 0.5


def test_a_job_the_population_cannot_serve_is_refused_before_it_starts() -> None:
    first = _job("pop-refuse")
    population = EmbeddedPopulation.of(first)
    options = EmbeddedOptions(population=population)
    with pytest.raises(ValueError, match="trains population 'other'"):
        run_job(_job("pop-other", population="other"), options=options)
    with pytest.raises(ValueError, match=r"spec\.fleet"):
        run_job(_job("pop-data", fleet={"seed": 99}), options=options)
    assert run_job(first, options=options).succeeded
    with pytest.raises(ValueError, match="already ran"):
        run_job(first, options=options)
    assert population.jobs == [first.key]
