"""The operator's plan for a running job's aggregator pool: scale up, drain, remove, cancel."""

from __future__ import annotations

from typing import Any

from fedfleet.core.spec import FLJobSpec, parse_manifest
from fedfleet_operator.pool import PoolSnapshot, Reason, plan_pool, pool_load, round_seconds

MiB = 1024 * 1024


def _spec(**actors: Any) -> FLJobSpec:
    doc = {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": "j"},
        "spec": {
            "population": "p",
            "rounds": {"goalCount": 100, "overSelection": 1.3},
            "fleet": {"devices": 1000},
            "actors": {
                "devicesPerAggregator": 50,
                "aggregatorBytesPerSecond": 10 * MiB,
                "scaleDownStabilizationSeconds": 0,
                **actors,
            },
        },
    }
    return parse_manifest(doc).spec


def _loads(names: list[str], update: int) -> dict[str, dict[str, Any]]:
    return {n: {"update_bytes": update, "bytes_per_second": 0.0} for n in names}


ROUNDS = [{"opened_at": 0.0, "ended_at": 10.0, "abandoned": False}]
"""One committed attempt of 10 s: the expected round time."""


def _snap(live: list[str], update: int, **kw: Any) -> PoolSnapshot:
    return PoolSnapshot(
        live=live,
        draining=frozenset(kw.pop("draining", ())),
        loads=_loads(live, update),
        busy=frozenset(kw.pop("busy", ())),
        attempts=ROUNDS,
        **kw,
    )


def test_round_seconds_from_committed_attempts_else_the_timeouts() -> None:
    spec = _spec()
    attempts = [
        {"opened_at": 0.0, "ended_at": 4.0, "abandoned": False},
        {"opened_at": 4.0, "ended_at": 100.0, "abandoned": True},  # abandoned: not a round time
        {"opened_at": 5.0, "ended_at": 11.0, "abandoned": False},
    ]
    assert round_seconds(spec, attempts) == 5.0
    assert round_seconds(spec, []) == 60.0  # min(selection 60 s, reporting 120 s)


def test_load_comes_from_the_registered_aggregators_only() -> None:
    snap = PoolSnapshot(
        live=["a", "b"],
        draining=frozenset(),
        loads={
            "a": {"update_bytes": 400, "bytes_per_second": 10.0, "fold_bytes_per_second": 9e6},
            "b": {"update_bytes": 400, "bytes_per_second": 5.0, "fold_bytes_per_second": 3e6},
            "gone": {"update_bytes": 999, "bytes_per_second": 1e9, "fold_bytes_per_second": 1.0},
        },
        busy=frozenset(),
    )
    load = pool_load(_spec(), snap)
    assert (load.update_bytes, load.measured_bytes_per_second) == (400, 15.0)
    assert load.measured_fold_bytes_per_second == 3e6
    assert load.selected_devices == 130


def test_a_large_model_scales_the_pool_up_at_once() -> None:
    spec = _spec()
    live = ["agg-a", "agg-b", "agg-c"]
    plan = plan_pool(spec, None, _snap(live, 5 * MiB), now=0.0)
    assert plan.replicas == 7  # 130 x 5 MiB / 10 s at 10 MiB/s each
    assert plan.status["desired"] == 7 and plan.status["current"] == 3
    assert plan.draining == [] and plan.remove == []
    assert [r for r, _ in plan.events] == [Reason.SCALED_UP]


def test_scale_down_drains_first_then_removes_only_idle_drained_aggregators() -> None:
    spec = _spec()
    live = [f"agg-{i}" for i in range(7)]
    status = {"replicas": 7, "desired": 7}
    # The load drops: 130 devices fit 4 at 70% of 50 each. Step 1: drain 3, idle ones first.
    plan = plan_pool(spec, status, _snap(live, 1024, busy={"agg-5", "agg-6"}), now=0.0)
    assert plan.replicas == 7 and plan.remove == [] and plan.status["desired"] == 4
    assert len(plan.draining) == 3 and not {"agg-5", "agg-6"} & set(plan.draining)
    assert [r for r, _ in plan.events] == [Reason.DRAINING]
    drained = plan.draining
    # Step 2: the coordinator has seen them draining; one still holds a round.
    busy = {drained[0]}
    plan2 = plan_pool(spec, plan.status, _snap(live, 1024, draining=drained, busy=busy), now=5.0)
    assert plan2.remove == drained[1:]
    assert plan2.replicas == 5
    assert plan2.status["leaving"] == drained[1:]
    assert set(plan2.draining) == set(drained)  # the leaving ones stay drained until gone
    assert [r for r, _ in plan2.events] == [Reason.SCALED_DOWN]
    # Step 3: the removed pods are gone; the last one's round ended.
    still = [a for a in live if a not in drained[1:]]
    plan3 = plan_pool(spec, plan2.status, _snap(still, 1024, draining=drained), now=10.0)
    assert plan3.remove == [drained[0]] and plan3.replicas == 4
    # Step 4: all gone: nothing drained any more, the pool holds.
    final = [a for a in still if a != drained[0]]
    plan4 = plan_pool(spec, plan3.status, _snap(final, 1024, draining=drained), now=15.0)
    assert (plan4.replicas, plan4.draining, plan4.remove, plan4.events) == (4, [], [], [])


def test_an_aggregator_is_removed_only_after_it_was_seen_draining() -> None:
    spec = _spec()
    live = [f"agg-{i}" for i in range(5)]
    plan = plan_pool(spec, {"replicas": 5, "desired": 5}, _snap(live, 1024), now=0.0)
    assert plan.remove == [] and len(plan.draining) == 1  # idle, but only just drained


def test_a_new_scale_up_cancels_the_drain() -> None:
    spec = _spec()
    live = [f"agg-{i}" for i in range(5)]
    plan = plan_pool(spec, {"replicas": 5, "desired": 5}, _snap(live, 1024, busy=set(live)), 0.0)
    assert len(plan.draining) == 1
    up = plan_pool(spec, plan.status, _snap(live, 5 * MiB, draining=plan.draining), now=5.0)
    assert up.replicas == 7 and up.draining == [] and up.remove == []


def test_replicas_are_never_lowered_without_a_drained_pod_to_remove() -> None:
    spec = _spec()
    live = ["agg-0", "agg-1", "agg-2"]  # 7 replicas, 4 still starting; 4 are enough
    plan = plan_pool(spec, {"replicas": 7, "desired": 7}, _snap(live, 1024), now=0.0)
    assert (plan.replicas, plan.draining, plan.remove, plan.events) == (7, [], [], [])
    assert plan.status["desired"] == 4
    # Once the others registered, the excess is drained like any other.
    everyone = [f"agg-{i}" for i in range(7)]
    later = plan_pool(spec, plan.status, _snap(everyone, 1024), now=5.0)
    assert len(later.draining) == 3 and later.replicas == 7


def test_a_drained_aggregator_the_replicaset_kept_serves_again() -> None:
    spec = _spec()
    # Removed agg-3 (leaving), but the ReplicaSet deleted another pod: 3 replicas, 3 live.
    status = {"replicas": 3, "desired": 3, "leaving": ["agg-3"], "draining": []}
    live = ["agg-0", "agg-1", "agg-3"]
    plan = plan_pool(spec, status, _snap(live, 1024, draining=["agg-3"]), now=0.0)
    assert plan.draining == [] and plan.status["leaving"] == []
