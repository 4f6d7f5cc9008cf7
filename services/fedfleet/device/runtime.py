"""The on-device FL runtime (Bonawitz et al. §3), independent of how it reaches the server.

It gates check-ins on eligibility and on the reconnect window the server handed out, runs the
plan on the device's Example Store, and aborts when eligibility is lost mid-task (the phone is
unplugged). The transport — in-process calls in the embedded runner, HTTP in a deployment —
lives with the caller; this module only decides and computes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.dp import clip_update
from fedfleet.core.eligibility import ineligibility_reason
from fedfleet.core.metrics import MetricsRejected, validate_metrics
from fedfleet.core.models import TrainingAborted, shapes_of
from fedfleet.core.privacy import secagg_params, secagg_vector
from fedfleet.core.protocol import CheckIn, Reconnect, ReportEnvelope, Task
from fedfleet.core.secagg import SecAggParams
from fedfleet.core.serde import encode_arrays
from fedfleet.core.spec import EligibilitySpec, TaskSpec
from fedfleet.tasks import Examples, LoadedTask, TaskError, load_task
from fedfleet.tasks.api import metrics_of

__all__ = [
    "ArrayExamples",
    "DeviceConditions",
    "ExampleSource",
    "FLRuntime",
    "SecureContribution",
    "TaskAborted",
]


class TaskAborted(Exception):
    """The device stopped its task (eligibility lost); nothing was reported."""


@dataclass(frozen=True, slots=True)
class SecureContribution:
    """A trained update that leaves the device only masked, through Secure Aggregation.

    ``vector`` is ``[w * clip(delta), w, metrics]`` (see :mod:`fedfleet.core.privacy`); it stays
    on the device, and only the protocol's messages derived from it are sent. ``metrics`` are the
    device's own (the plan's ``metric_names`` of them are inside ``vector``).
    """

    device_id: str
    round_key: str
    aggregator: str
    ticket: str
    params: SecAggParams
    vector: NDArray[np.float64]
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class DeviceConditions:
    charging: bool
    unmetered: bool
    idle: bool


class ExampleSource(Protocol):
    """What the runtime reads training data from (the Example Store's query API): records as
    named fields of equal length (:data:`fedfleet.tasks.Examples`)."""

    def count(self, now: float) -> int: ...

    def query(self, now: float, *, limit: int | None = None) -> Examples: ...


class ArrayExamples:
    """An Example Store over arrays already in memory (a shard of a dataset, in simulation)."""

    def __init__(self, fields: Mapping[str, NDArray[Any]]) -> None:
        self._fields = dict(fields)
        self._n = len(next(iter(self._fields.values()))) if self._fields else 0

    def count(self, now: float) -> int:
        return self._n

    def query(self, now: float, *, limit: int | None = None) -> Examples:
        if limit is None:
            return self._fields
        return {k: v[:limit] for k, v in self._fields.items()}


def _reported(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
    """A task's metrics as the server takes them: ``<prefix>_<name>``, valid names only."""
    out: dict[str, float] = {}
    for name, value in metrics_of(values).items():
        key = f"{prefix}_{name}".lower()
        try:
            out.update(validate_metrics({key: value}))
        except MetricsRejected:
            continue
    return out


class FLRuntime:
    def __init__(
        self,
        device_id: str,
        population: str,
        examples: ExampleSource,
        *,
        policy: EligibilitySpec | None = None,
        rng: np.random.Generator,
        tasks: Callable[[TaskSpec], LoadedTask] = load_task,
    ) -> None:
        """``tasks`` turns the task a plan names into the code to run. The default imports
        it (the simulator's devices run what the manifest names); an app on a real device
        passes one that answers only for the tasks it ships and raises ``TaskError``
        otherwise."""
        self.device_id = device_id
        self.tasks = tasks
        self.population = population
        self.examples = examples
        self.policy = policy or EligibilitySpec()
        self.rng = rng
        self.next_checkin = 0.0
        """The runtime does not check in before this time (the reconnect window's pick)."""

    def ineligible_because(self, conditions: DeviceConditions, now: float) -> str | None:
        return ineligibility_reason(
            self.policy,
            charging=conditions.charging,
            unmetered=conditions.unmetered,
            idle=conditions.idle,
            num_examples=self.examples.count(now),
        )

    def should_check_in(self, conditions: DeviceConditions, now: float) -> bool:
        return now >= self.next_checkin and self.ineligible_because(conditions, now) is None

    def checkin(self, conditions: DeviceConditions, now: float) -> CheckIn:
        return CheckIn(
            device_id=self.device_id,
            population=self.population,
            charging=conditions.charging,
            unmetered=conditions.unmetered,
            idle=conditions.idle,
            num_examples=self.examples.count(now),
        )

    def on_reconnect(self, window: Reconnect) -> float:
        """Pick a time inside the server's window (uniformly: this is what spreads the herd)."""
        lo, hi = window.not_before, max(window.not_before, window.not_after)
        self.next_checkin = float(self.rng.uniform(lo, hi)) if hi > lo else lo
        return self.next_checkin

    def execute(
        self, task: Task, now: float, still_eligible: Callable[[int], bool]
    ) -> ReportEnvelope | SecureContribution:
        """Run the plan; ``still_eligible(epoch)`` is asked before every epoch.

        Returns the report to upload, or — when the task's privacy plan asks for Secure
        Aggregation — the contribution to feed into the protocol. With DP on, the update is
        clipped to the plan's L2 norm first. Raises :class:`TaskAborted` when eligibility is
        lost, before anything is reported.
        """
        records = self.examples.query(now)
        if not still_eligible(0):
            raise TaskAborted("eligibility lost before training")
        try:
            loaded = self.tasks(task.task)
        except TaskError as exc:
            raise TaskAborted(f"cannot run task {task.task.ref}: {exc}") from None
        if shapes_of(task.weights) != loaded.shapes:
            raise TaskAborted(
                f"checkpoint {task.model_version} has shapes {shapes_of(task.weights)}, "
                f"the task needs {loaded.shapes}"
            )
        fl_task = loaded.task
        examples = fl_task.decode(records)
        metrics: dict[str, float] = {}
        if task.evaluate:
            metrics.update(_reported("federated", fl_task.evaluate(task.weights, examples)))
        try:
            result = fl_task.train(task.weights, examples, task.plan, self.rng, still_eligible)
        except TrainingAborted as exc:
            raise TaskAborted(str(exc)) from None
        diff = [np.asarray(u, dtype=np.float32) for u in result.update]
        metrics.update(_reported("train", result.metrics))
        privacy = task.privacy
        if privacy is not None and privacy.secure_aggregation:
            return SecureContribution(
                device_id=self.device_id,
                round_key=task.assignment.round_key,
                aggregator=task.assignment.aggregator,
                ticket=task.assignment.ticket,
                params=secagg_params(privacy, loaded.shapes),
                vector=secagg_vector(privacy, diff, result.num_examples, metrics),
                metrics=metrics,
            )
        if privacy is not None and privacy.clip_norm is not None:
            diff, _ = clip_update(diff, privacy.clip_norm)
        return ReportEnvelope(
            device_id=self.device_id,
            round_key=task.assignment.round_key,
            ticket=task.assignment.ticket,
            num_examples=result.num_examples,
            update=encode_arrays(diff),
            metrics=metrics,
        )
