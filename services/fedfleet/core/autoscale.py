"""How many aggregators a job needs, from its devices and its update bytes, without flapping.

Bonawitz et al. (§4.2) have the Master Aggregator size the pool of Aggregators to the devices
a round selects and to the size of their updates. Two loads bound an aggregator:

- **devices**: the reports a round sends it (``actors.devicesPerAggregator`` each, as before);
- **bytes**: the update bytes it must validate and fold per second. What a round brings is
  ``selected devices x update bytes / round seconds`` (the update size is the model's, known
  from the task's initial weights before any device reports); what the aggregators measured
  (bytes per second taken in, over their last minute) replaces it when it is larger. One
  aggregator folds ``actors.aggregatorBytesPerSecond``, or less when its own measured fold
  throughput (bytes per second of fold time) says the machine is slower than that.

:func:`size_pool` turns a :class:`PoolLoad` into a count within ``[minAggregators,
maxAggregators]`` (and no more than a round can use: see :func:`round_aggregator_limit`).
:func:`decide` adds hysteresis: it scales up at once when the load needs more aggregators than
run; it scales down only when the load would fit the smaller pool even at
``actors.scaleDownUtilization`` of its capacity, and has kept fitting it for
``actors.scaleDownStabilizationSeconds`` (then to the largest size recommended during that
window, as the HorizontalPodAutoscaler does). Between the two thresholds the pool holds.

:class:`LoadWindow` is what an aggregator keeps to publish its measured rates. Everything here
takes its clock as an argument and does no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from fedfleet.core.spec import FLJobSpec

__all__ = [
    "LOAD_WINDOW_SECONDS",
    "Direction",
    "LoadWindow",
    "PoolLoad",
    "PoolPolicy",
    "ScaleDecision",
    "ScaleState",
    "Sizing",
    "decide",
    "round_aggregator_limit",
    "size_pool",
    "update_bytes",
]

LOAD_WINDOW_SECONDS: Final = 60.0
"""An aggregator's measured rates are over its last minute of reports."""


def update_bytes(shapes: list[tuple[int, ...]] | tuple[tuple[int, ...], ...]) -> int:
    """Bytes of one plain update of a model of these shapes (float32 values)."""
    return 4 * sum(math.prod(s) for s in shapes)


def round_aggregator_limit(spec: FLJobSpec) -> int:
    """The most aggregators one round can spread its devices over.

    With Secure Aggregation each aggregator is a group that must reach ``minGroupSize`` of the
    round's minimum report count, so more groups than that fit would fail the round; otherwise
    a group needs at least one device."""
    sa = spec.aggregation.secure_aggregation
    if sa.enabled:
        return max(1, spec.rounds.minimum_count // sa.min_group_size)
    return max(1, spec.rounds.selection_target)


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """The sizing fields of a spec (``spec.actors``), and what a round can use."""

    min_aggregators: int
    max_aggregators: int
    devices_per_aggregator: int
    bytes_per_second: float
    """Update bytes one aggregator folds per second at full load."""
    scale_down_utilization: float
    """Shrink only to a pool that would run at or below this fraction of its capacity."""
    stabilization_seconds: float
    """The load must fit the smaller pool this long before the pool shrinks."""
    round_limit: int
    """:func:`round_aggregator_limit`: aggregators beyond it would sit idle."""

    @classmethod
    def of(cls, spec: FLJobSpec) -> PoolPolicy:
        a = spec.actors
        return cls(
            min_aggregators=a.min_aggregators,
            max_aggregators=a.max_aggregators,
            devices_per_aggregator=a.devices_per_aggregator,
            bytes_per_second=float(a.aggregator_bytes_per_second),
            scale_down_utilization=a.scale_down_utilization,
            stabilization_seconds=a.scale_down_stabilization_seconds,
            round_limit=round_aggregator_limit(spec),
        )

    @property
    def ceiling(self) -> int:
        """The largest pool worth running (``minAggregators`` wins over the round limit)."""
        return max(self.min_aggregators, min(self.max_aggregators, self.round_limit))


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """What the coming rounds ask of the pool."""

    selected_devices: int
    """Devices each coming round selects (goal count x over-selection)."""
    update_bytes: int
    """Bytes of one device's update (the model's size, from the task's initial weights)."""
    round_seconds: float
    """Expected seconds a round takes (measured from recent rounds, or the spec's timeouts)."""
    measured_bytes_per_second: float = 0.0
    """Update bytes per second the pool's aggregators took in lately, summed."""
    measured_fold_bytes_per_second: float | None = None
    """The slowest aggregator's fold throughput: bytes folded per second spent folding."""

    @property
    def predicted_bytes_per_second(self) -> float:
        return self.selected_devices * self.update_bytes / max(self.round_seconds, 1e-3)

    @property
    def demand_bytes_per_second(self) -> float:
        return max(self.predicted_bytes_per_second, self.measured_bytes_per_second)


@dataclass(frozen=True, slots=True)
class Sizing:
    """A pool size and why."""

    count: int
    by_devices: int
    by_bytes: int
    demand: float
    """Update bytes per second the pool must fold."""
    capacity: float
    """Bytes per second one aggregator is counted on to fold."""
    reason: str
    """What decided the count: ``devices``, ``bytes``, ``minAggregators``, ``maxAggregators``
    or ``roundLimit``."""

    def describe(self) -> str:
        return (
            f"{self.count} aggregator(s) ({self.reason}): devices need {self.by_devices}, "
            f"{_rate(self.demand)} of updates at {_rate(self.capacity)} each need {self.by_bytes}"
        )


def _rate(bps: float) -> str:
    for unit in ("B/s", "KiB/s", "MiB/s", "GiB/s"):
        if bps < 1024 or unit == "GiB/s":
            return f"{bps:.0f} {unit}" if unit == "B/s" else f"{bps:.1f} {unit}"
        bps /= 1024
    raise AssertionError("unreachable")


def size_pool(policy: PoolPolicy, load: PoolLoad, *, utilization: float = 1.0) -> Sizing:
    """Aggregators the load needs with each running at ``utilization`` of its capacity."""
    capacity = policy.bytes_per_second
    measured = load.measured_fold_bytes_per_second
    if measured is not None and measured > 0:
        capacity = min(capacity, measured)
    demand = load.demand_bytes_per_second
    by_devices = math.ceil(load.selected_devices / (policy.devices_per_aggregator * utilization))
    by_bytes = math.ceil(demand / (capacity * utilization) - 1e-9)
    wanted = max(1, by_devices, by_bytes)
    reason = "bytes" if by_bytes > by_devices else "devices"
    count = wanted
    if count < policy.min_aggregators:
        count, reason = policy.min_aggregators, "minAggregators"
    ceiling = policy.ceiling
    if count > ceiling:
        count = ceiling
        reason = "maxAggregators" if ceiling == policy.max_aggregators else "roundLimit"
    return Sizing(count, by_devices, by_bytes, demand, capacity, reason)


class Direction(StrEnum):
    up = "up"
    down = "down"
    hold = "hold"


@dataclass(frozen=True, slots=True)
class ScaleState:
    """What hysteresis remembers between decisions (kept in the FLJob's status)."""

    replicas: int
    """Aggregators the pool runs now (the Deployment's replicas)."""
    low_since: float | None = None
    """Since when the load has fit a smaller pool (None: it does not)."""
    low_peak: int = 0
    """The largest smaller size recommended since ``low_since``."""


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    replicas: int
    direction: Direction
    state: ScaleState
    """The state to keep for the next decision."""
    message: str
    sizing: Sizing


def decide(policy: PoolPolicy, state: ScaleState, load: PoolLoad, now: float) -> ScaleDecision:
    """Scale up at once; scale down after the load stayed low for the stabilization window."""
    current = state.replicas
    need = size_pool(policy, load)
    if need.count > current:
        return ScaleDecision(
            need.count,
            Direction.up,
            ScaleState(need.count),
            f"scaling up from {current}: load needs {need.describe()}",
            need,
        )
    if current > policy.ceiling:  # the spec lowered the bounds: no reason to wait
        return ScaleDecision(
            policy.ceiling,
            Direction.down,
            ScaleState(policy.ceiling),
            f"scaling down from {current} to the spec's bound of {policy.ceiling}",
            need,
        )
    low = size_pool(policy, load, utilization=policy.scale_down_utilization)
    if low.count >= current:
        return ScaleDecision(
            current, Direction.hold, ScaleState(current), f"holding: {need.describe()}", need
        )
    since = state.low_since if state.low_since is not None else now
    peak = max(state.low_peak, low.count)
    waited = now - since
    if waited >= policy.stabilization_seconds:
        return ScaleDecision(
            peak,
            Direction.down,
            ScaleState(peak),
            f"scaling down from {current} to {peak}: for {waited:.0f}s the load fit {peak} "
            f"at {policy.scale_down_utilization:.0%} of capacity ({need.describe()})",
            need,
        )
    return ScaleDecision(
        current,
        Direction.hold,
        replace(state, low_since=since, low_peak=peak),
        f"holding {current}: the load fits {peak} for {waited:.0f}s of "
        f"{policy.stabilization_seconds:.0f}s ({need.describe()})",
        need,
    )


@dataclass(slots=True)
class LoadWindow:
    """An aggregator's reports over the last ``seconds``: its measured rates."""

    seconds: float = LOAD_WINDOW_SECONDS
    started: float | None = None
    _events: deque[tuple[float, int, float]] = field(default_factory=deque)
    """(time, update bytes, seconds spent validating and folding it)."""

    def add(self, now: float, nbytes: int, fold_seconds: float) -> None:
        self._events.append((now, nbytes, max(0.0, fold_seconds)))
        self._prune(now)

    def _prune(self, now: float) -> None:
        if self.started is None:
            self.started = now
        while self._events and self._events[0][0] < now - self.seconds:
            self._events.popleft()

    def rates(self, now: float) -> dict[str, Any]:
        """``reports_per_second``, ``bytes_per_second``, ``fold_utilization`` (share of the
        time spent folding) and ``fold_bytes_per_second`` (None before any report)."""
        self._prune(now)
        started = self.started if self.started is not None else now
        span = max(1.0, min(self.seconds, now - started))
        n = len(self._events)
        nbytes = sum(e[1] for e in self._events)
        busy = sum(e[2] for e in self._events)
        return {
            "reports_per_second": n / span,
            "bytes_per_second": nbytes / span,
            "fold_utilization": min(1.0, busy / span),
            "fold_bytes_per_second": nbytes / busy if busy > 0 else None,
        }
