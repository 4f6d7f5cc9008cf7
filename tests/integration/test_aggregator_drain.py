"""Draining an aggregator over real Redis and real HTTP actors: no new round, its round ends.

The operator shrinks the pool by writing aggregators to the store's draining set and removing
them only once they hold no open round (``fedfleet_operator.pool``). This runs the deployed
shape (redis-server, uvicorn coordinator, selector and three aggregators, the HTTP fleet),
drains the master of a round that is reporting and has already folded a report there, the
way the operator's first step does, and checks what the coordinator and that aggregator do.
"""

from __future__ import annotations

from typing import Any

from fedfleet.local import LocalDeployment
from tests.integration.deployed import Fault, run_deployed, small_job


def test_a_draining_aggregator_gets_no_new_round_and_finishes_the_one_it_holds() -> None:
    job = small_job(
        "drain",
        rounds={"total": 14, "goalCount": 6},
        actors={"selectors": 1, "devicesPerAggregator": 2},  # rounds spread over all three
    )
    seen: dict[int, tuple[str, ...]] = {}
    """Every attempt's aggregators, as the store showed it (attempts stay 5 s after ending)."""
    drained: dict[str, Any] = {}

    def observe(d: LocalDeployment) -> bool:
        try:
            for r in d.store.rounds(job.name):
                seen.setdefault(r.attempt, r.aggregators)
        except Exception:
            pass
        return False  # never fires: called every 0.1 s for the whole run

    def holding_master(d: LocalDeployment) -> bool:
        try:
            if d.store.model_version(job.name) < 2:
                return False
            for r in d.store.rounds(job.name):
                reported = d.store.counts(job.name, r.key, "reported")
                if r.phase.value == "reporting" and reported.get(r.master, 0) >= 1:
                    drained.update(aggregator=r.master, attempt=r.attempt, key=r.key)
                    return True
        except Exception:
            pass
        return False

    def drain(d: LocalDeployment) -> None:
        d.store.set_draining(job.name, [drained["aggregator"]])
        drained["newest"] = max(r.attempt for r in d.store.rounds(job.name))

    out = run_deployed(
        job,
        faults=[Fault(observe, lambda d: None), Fault(holding_master, drain)],
        coordinators=1,
        selectors=1,
        aggregators=3,
    )
    assert out.finished
    assert "newest" in drained, "no round was ever reporting with a report at its master"
    victim = drained["aggregator"]
    committed = [a for a in out.attempts if not a["abandoned"]]
    assert [a["model_version"] for a in committed] == list(range(1, 15))

    # The round it held when it was drained ran to its commit, with its reports in it.
    [held] = [a for a in out.attempts if a["attempt"] == drained["attempt"]]
    assert not held["abandoned"], held
    assert held["metrics"]["reports"] == held["reported"] >= 1

    # Every attempt opened after the write (one opened in a tick that straddled it may have
    # read the set before) leaves the drained aggregator out; the others carry the job.
    assert {a["attempt"] for a in out.attempts} <= set(seen), "an attempt was never observed"
    # When the drain lands depends on when a master first holds a report (it fired as late as
    # version 7 of 10 once); 14 rounds leave several attempts after it whenever it lands.
    later = {n: aggs for n, aggs in seen.items() if n >= drained["newest"] + 2}
    assert len(later) >= 2, (drained, later)
    assert all(victim not in aggs for aggs in later.values()), (victim, later)
    assert all(len(aggs) == 2 for aggs in later.values())
    before = [aggs for n, aggs in seen.items() if n < drained["attempt"]]
    assert any(victim in aggs for aggs in before)  # it did serve rounds until then
