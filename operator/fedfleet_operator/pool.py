"""The aggregator pool of a running job: what to scale, drain and remove, from the store's view.

The sizing rule is :mod:`fedfleet.core.autoscale`; this module turns one look at the store (the
registered aggregators, the ones being drained, their published loads, the rounds they hold,
the last attempts' durations) and the hysteresis state kept in ``status.aggregators`` into a
:class:`PoolPlan`: the Deployment's replicas, the draining set to write, the pods to remove and
the Events to post. It is pure (``now`` and the snapshot are arguments), so every step of a
resize is unit-tested; :mod:`.handlers.scale` reads the store and applies the plan.

**Scaling down drains, never cuts a round.** An aggregator to remove is first written to the
store's draining set; the coordinator opens no new round on it, the rounds it holds run to
their end (it folds, publishes and, as master, commits as usual). Only once it was already
draining at the previous look (so a coordinator tick has seen the set) and holds no open round
does the plan remove it: its pod gets the lowest ``controller.kubernetes.io/pod-deletion-cost``
and the Deployment's replicas drop by one, so the ReplicaSet deletes that pod (or, first, a pod
not ready, which holds no round either). Replicas never drop without such a mark: pods still
starting are left to register, then drained like the others. Scaling up cancels a drain (the
drained aggregators simply serve again). A drained aggregator still registered once the pool
is at its size (the ReplicaSet chose another pod, e.g. one not ready) is taken off the
draining set and serves again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NotRequired, TypedDict

from fedfleet.core.autoscale import Direction, PoolLoad, PoolPolicy, ScaleState, decide
from fedfleet.core.spec import FLJobSpec

__all__ = [
    "POD_DELETION_COST",
    "REMOVED_POD_COST",
    "AggregatorStatus",
    "PoolPlan",
    "PoolSnapshot",
    "Reason",
    "plan_pool",
    "pool_load",
    "round_seconds",
]

POD_DELETION_COST: Final = "controller.kubernetes.io/pod-deletion-cost"
"""The ReplicaSet controller deletes the pods of lowest cost first when it scales down."""
REMOVED_POD_COST: Final = "-1000000"
"""The cost given to a drained aggregator's pod just before the replicas drop."""
_RECENT: Final = 8
"""Committed attempts whose mean duration is the expected round time."""


class Reason:
    """Reasons of the Events the operator posts about the pool."""

    SCALED_UP: Final = "AggregatorsScaledUp"
    DRAINING: Final = "AggregatorsDraining"
    SCALED_DOWN: Final = "AggregatorsScaledDown"
    DRAIN_CANCELLED: Final = "AggregatorDrainCancelled"


class AggregatorStatus(TypedDict):
    """``status.aggregators``: the pool and the last sizing decision."""

    replicas: int
    """The Deployment's replicas, as last set."""
    desired: int
    """Aggregators the load needs (the pool is heading there)."""
    current: int
    """Aggregators registered in the store now (draining ones included)."""
    draining: list[str]
    """Aggregators given no new round, waiting for theirs to end."""
    leaving: list[str]
    """Drained aggregators whose pods were removed and are still shutting down."""
    reason: str
    demandBytesPerSecond: int
    capacityBytesPerSecond: int
    lowSince: NotRequired[float]
    """Unix time since which the load fits a smaller pool (hysteresis)."""
    lowPeak: NotRequired[int]


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """One look at the store."""

    live: Sequence[str]
    """Registered aggregators (pod names)."""
    draining: frozenset[str]
    loads: Mapping[str, Mapping[str, Any]]
    busy: frozenset[str]
    """Aggregators named by a round that is not finished."""
    attempts: Sequence[Mapping[str, Any]] = ()
    """The last few finished attempts."""


@dataclass(frozen=True, slots=True)
class PoolPlan:
    replicas: int
    draining: list[str]
    remove: list[str]
    """Pods to give the lowest deletion cost before ``replicas`` is written."""
    status: AggregatorStatus
    events: list[tuple[str, str]] = field(default_factory=list)
    """(reason, message) of each decision, for the FLJob's Events."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def round_seconds(spec: FLJobSpec, attempts: Sequence[Mapping[str, Any]]) -> float:
    """The expected round time: the mean duration of the last committed attempts; before any,
    the shorter of the selection and reporting timeouts (the coordinator's starting guess)."""
    durations = []
    for a in attempts[-_RECENT:]:
        opened, ended = _number(a.get("opened_at")), _number(a.get("ended_at"))
        if not a.get("abandoned") and opened is not None and ended is not None and ended > opened:
            durations.append(ended - opened)
    if durations:
        return sum(durations) / len(durations)
    return min(spec.rounds.selection_timeout_seconds, spec.rounds.reporting_timeout_seconds)


def pool_load(spec: FLJobSpec, snap: PoolSnapshot) -> PoolLoad:
    """The load of the coming rounds: the spec's selection, the model's update size and the
    rates the registered aggregators published."""
    loads = [snap.loads[a] for a in snap.live if a in snap.loads]
    sizes = [int(v) for x in loads if (v := _number(x.get("update_bytes"))) is not None]
    taken = [v for x in loads if (v := _number(x.get("bytes_per_second"))) is not None]
    folds = [v for x in loads if (v := _number(x.get("fold_bytes_per_second"))) and v > 0]
    return PoolLoad(
        selected_devices=spec.rounds.selection_target,
        update_bytes=max(sizes, default=0),
        round_seconds=round_seconds(spec, snap.attempts),
        measured_bytes_per_second=sum(taken),
        measured_fold_bytes_per_second=min(folds, default=None),
    )


def _state(previous: Mapping[str, Any], replicas: int) -> ScaleState:
    desired = previous.get("desired")
    since = _number(previous.get("lowSince"))
    peak = previous.get("lowPeak")
    return ScaleState(
        replicas=desired if isinstance(desired, int) and desired > 0 else replicas,
        low_since=since,
        low_peak=peak if isinstance(peak, int) else 0,
    )


def plan_pool(
    spec: FLJobSpec, previous: Mapping[str, Any] | None, snap: PoolSnapshot, now: float
) -> PoolPlan:
    """The next step for the pool of a running job (``previous``: ``status.aggregators``)."""
    prev = previous or {}
    replicas = prev.get("replicas")
    if not isinstance(replicas, int) or replicas < 0:
        replicas = spec.actors.aggregator_count(spec.rounds)
    policy = PoolPolicy.of(spec)
    load = pool_load(spec, snap)
    decision = decide(policy, _state(prev, replicas), load, now)
    target = decision.replicas
    leaving = [a for a in prev.get("leaving") or [] if isinstance(a, str) and a in snap.live]
    if len(snap.live) <= replicas:
        # Nobody is on the way out after all (the ReplicaSet removed another pod, one that
        # was not ready): the ones still here stay and serve.
        leaving = []
    live = sorted(a for a in snap.live if a not in leaving)
    drained = sorted(snap.draining & set(live))
    events: list[tuple[str, str]] = []
    remove: list[str] = []
    if target > replicas:
        events.append((Reason.SCALED_UP, f"{replicas} -> {target}: {decision.message}"))
        replicas, drained = target, []
    elif target == replicas:
        if drained and len(live) <= replicas:
            # Nobody is leaving any more, yet these are still here: they stay and serve.
            events.append((Reason.DRAIN_CANCELLED, f"{', '.join(drained)} serve again"))
            drained = []
    else:
        # Only registered aggregators beyond the target are drained: replicas still starting
        # are left to register first (lowering the replicas without marking a pod would let
        # the ReplicaSet pick any pod, perhaps one holding a round).
        wanted = min(replicas - target, max(0, len(live) - target))
        if len(drained) > wanted:
            drained = drained[:wanted]
        if len(drained) < wanted:
            # Idle ones first (by name, so the choice is stable from look to look).
            candidates = sorted(
                (a for a in live if a not in drained), key=lambda a: (a not in snap.busy, a)
            )
            fresh = candidates[-(wanted - len(drained)) :]
            drained = sorted([*drained, *fresh])
            events.append(
                (
                    Reason.DRAINING,
                    f"{replicas} -> {target}: draining {', '.join(fresh)} (no new rounds; "
                    f"removed once their rounds end): {decision.message}",
                )
            )
        # Removed only once a coordinator tick has seen them draining, and idle.
        remove = [a for a in drained if a in snap.draining and a not in snap.busy]
        if remove:
            replicas -= len(remove)
            leaving = sorted([*leaving, *remove])
            drained = [a for a in drained if a not in remove]
            events.append(
                (Reason.SCALED_DOWN, f"-> {replicas}: removing {', '.join(remove)} (no open round)")
            )
    status: AggregatorStatus = {
        "replicas": replicas,
        "desired": target,
        "current": len(snap.live),
        "draining": drained,
        "leaving": leaving,
        "reason": decision.message,
        "demandBytesPerSecond": int(decision.sizing.demand),
        "capacityBytesPerSecond": int(decision.sizing.capacity),
    }
    if decision.direction is Direction.hold and decision.state.low_since is not None:
        status["lowSince"] = decision.state.low_since
        status["lowPeak"] = decision.state.low_peak
    return PoolPlan(replicas, sorted({*drained, *leaving}), remove, status, events)
