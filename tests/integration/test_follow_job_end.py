"""``fedfleet up`` follows a job to its end without losing its last round.

The follower reads the store's attempt history and the job's state. The coordinator records a
round's attempt before it writes the job's end, so reading the state first and the attempts
after it is complete; read the other way round, a run whose last round and end were written
between the two reads ended with one round missing from its report ("49 of 50 rounds
committed" in ``bench/up.py``). Here the coordinator's last writes land exactly between the
follower's two reads: inside its second read of the job's state.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedfleet.core.roles import JobPhase
from fedfleet.results import JobResult
from fedfleet.store.memory import MemoryStore
from fedfleet.up import StoreWatch, follow
from tests.integration.deployed import small_job

pytestmark = pytest.mark.integration

JOB = small_job("follow-end")


def _attempt(n: int) -> dict[str, Any]:
    return {
        "round": n,
        "attempt": n,
        "selected": 3,
        "reported": 3,
        "dropped": 0,
        "abandoned": False,
        "reason": "",
        "opened_at": 0.0,
        "ended_at": 1.0,
        "model_version": n,
        "metrics": {"accuracy": 0.5},
    }


class LastRoundLands(MemoryStore):
    """Two rounds recorded; the third and the job's end are written by the coordinator the
    moment the follower asks for the job's state the second time (after it has read the first
    two rounds, when it has nothing new)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = self.acquire_lease(JOB.key, "coordinator-0", ttl=60.0)
        assert self.token is not None
        for n in (1, 2):
            self.record_attempt(JOB.key, self.token, _attempt(n))
        self.put_job_state(JOB.key, self.token, {"phase": JobPhase.running.value})
        self.asked = 0

    def job_state(self, job: str) -> dict[str, Any]:
        self.asked += 1
        if self.asked == 2:
            assert self.token is not None
            self.record_attempt(JOB.key, self.token, _attempt(3))
            self.put_job_state(JOB.key, self.token, {"phase": JobPhase.succeeded.value})
        return super().job_state(job)


class _Deployment:
    """What ``follow`` and ``StoreWatch`` use of a local deployment."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.job = JOB
        self.redis = None


def test_the_last_round_written_with_the_jobs_end_is_in_the_result() -> None:
    store = LastRoundLands()
    deployment: Any = _Deployment(store)
    result = JobResult(job=JOB.name)
    finished = asyncio.run(
        follow(deployment, result, None, timeout=30, poll=0.01, watch=StoreWatch(deployment))
    )
    assert finished
    assert [r.round for r in result.rounds] == [1, 2, 3]
