"""Embedded fedfleet: the whole deployed shape in one process, on simulated time.

``fedfleet run`` builds exactly the actors a deployment runs — a Coordinator with a standby,
Selectors, Aggregators (one of them the round's master) — over the in-memory store, and a
simulated fleet of devices holding shards of a real dataset. They talk through the same
interfaces the services use; only the transport (method calls instead of HTTP) and the clock
(a discrete-event loop instead of wall time) differ. A day of simulated check-ins costs only
the training it contains.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedfleet.aggregator.actor import Aggregator
from fedfleet.coordinator.actor import AttemptEnd, Coordinator, CoordinatorSettings
from fedfleet.core.checkpoint import unpack_checkpoint
from fedfleet.core.models import Weights
from fedfleet.core.protocol import ReportEnvelope
from fedfleet.core.roles import JobPhase
from fedfleet.core.spec import EligibilitySpec, EvaluationSpec, FleetSpec, FLJob
from fedfleet.device.datasets import DatasetSplit, prepare
from fedfleet.device.fleet import SelectorPort, SimulatedFleet
from fedfleet.device.simloop import SimLoop
from fedfleet.results import (
    JobResult,
    ProgressSink,
    RoundRecord,
    best_model_of,
    device_metrics,
    numeric_metrics,
)
from fedfleet.selector.actor import Selector
from fedfleet.store.history import checkpoint_bytes
from fedfleet.store.memory import MemoryStore
from fedfleet.tasks import task_of
from fedfleet.tasks.evaluation import task_evaluator
from fedfleet.tasks.validation import check_job_data

__all__ = [
    "Adversary",
    "EmbeddedOptions",
    "EmbeddedPopulation",
    "Fault",
    "run_job",
    "train_workers",
]

Adversary = Callable[[ReportEnvelope, Weights], ReportEnvelope]
"""A hostile device in one process: gets each report (authenticated, ticketed) and the model
its round trains from, and returns the report the aggregator receives instead."""


@dataclass(frozen=True, slots=True)
class Fault:
    """Crash an actor at a simulated time (chaos in one process)."""

    at: float
    actor: str
    """Actor id, e.g. ``coordinator-0``, ``selector-1``, ``aggregator-0``."""


class EmbeddedPopulation:
    """A population's simulated devices, kept across the jobs run on it one after another.

    Devices join a population once and take part in whatever jobs it runs (Bonawitz et al.
    2019, section 3). Passed as :attr:`EmbeddedOptions.population`, it gives every
    :func:`run_job` the same simulated clock, store and fleet: the devices (their examples,
    eligibility and reconnect windows) keep running from one job into the next, check in with
    the selectors of whichever job is running, and back off while none is. Every job run on it
    must name this population and this fleet (the devices' data).
    """

    def __init__(
        self,
        population: str,
        fleet: FleetSpec,
        *,
        evaluation: EvaluationSpec | None = None,
        eligibility: EligibilitySpec | None = None,
    ) -> None:
        self.population = population
        self.fleet_spec = fleet
        self.evaluation = evaluation
        self.loop = SimLoop()
        self.store = MemoryStore(clock=self.loop.clock)
        self.data = prepare(fleet, evaluation)
        self._serving: Callable[[], Sequence[SelectorPort]] = tuple
        self.fleet = SimulatedFleet(
            fleet, population, self.data, self.loop, lambda: self._serving(), policy=eligibility
        )
        self.fleet.start()
        self.jobs: list[str] = []
        """The jobs run on the population so far, in order."""

    @classmethod
    def of(cls, job: FLJob) -> EmbeddedPopulation:
        """The population ``job`` names, with its fleet, evaluation and eligibility."""
        spec = job.spec
        return cls(
            spec.population, spec.fleet, evaluation=spec.evaluation, eligibility=spec.eligibility
        )

    def admit(self, job: FLJob) -> None:
        """Check ``job`` can run on these devices; the error names what differs."""
        if job.spec.population != self.population:
            raise ValueError(
                f"job {job.name} trains population {job.spec.population!r}, these devices "
                f"belong to {self.population!r}"
            )
        if job.spec.fleet != self.fleet_spec or job.spec.evaluation != self.evaluation:
            raise ValueError(
                f"job {job.name}: spec.fleet and spec.evaluation must be the population's "
                "(its devices hold that data)"
            )
        if job.key in self.jobs:
            raise ValueError(f"job {job.name} already ran on this population")

    def serve(self, selectors: Callable[[], Sequence[SelectorPort]]) -> None:
        """Devices check in with ``selectors`` from now on (``tuple``: no job is running)."""
        self._serving = selectors


@dataclass(frozen=True, slots=True)
class EmbeddedOptions:
    tick_seconds: float = 1.0
    """How often actors run their timers, in simulated seconds."""
    standby: bool = True
    """Run a standby coordinator that takes the lease if the active one dies."""
    faults: Sequence[Fault] = field(default_factory=tuple)
    settings: CoordinatorSettings = field(default_factory=CoordinatorSettings)
    adversary: Adversary | None = None
    """Rewrites reports before they reach the aggregator (the hostile tests' attacker)."""
    population: EmbeddedPopulation | None = None
    """Run on these long-lived devices (and their clock and store) instead of a fleet of the
    job's own; later jobs of the population reuse them."""
    train_workers: int | None = None
    """Devices trained at once, in threads (the results are the same). None: one per CPU
    for a task whose training releases the GIL (``FLTask.parallel_training``, the PyTorch
    adapter), else 1. A population's devices train one at a time."""


def train_workers(job: FLJob, opts: EmbeddedOptions) -> int:
    """How many devices of ``job`` the embedded runner trains at once under ``opts``."""
    if opts.train_workers is not None:
        return max(1, opts.train_workers)
    if not task_of(job).task.parallel_training:
        return 1
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may use (Linux)
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _evaluator(job: FLJob, data: DatasetSplit) -> Callable[[Weights], dict[str, float]] | None:
    """Server-side evaluation with the task's evaluate on the held-out examples, if any."""
    return None if data.test is None else task_evaluator(task_of(job), data.test)


def run_job(
    job: FLJob, *, progress: ProgressSink | None = None, options: EmbeddedOptions | None = None
) -> JobResult:
    """Run an FLJob to the end in this process and return what it produced."""
    opts = options or EmbeddedOptions()
    spec = job.spec
    wall0 = time.perf_counter()
    pop = opts.population
    if pop is not None:
        pop.admit(job)
        loop, store, data = pop.loop, pop.store, pop.data
    else:
        loop = SimLoop()
        store = MemoryStore(clock=loop.clock)
        data = prepare(spec.fleet, spec.evaluation)
    started_at = loop.now
    secret = secrets.token_bytes(32)
    check_job_data(job, data.train, data.test)
    evaluator = _evaluator(job, data)

    aggregators = {
        f"aggregator-{i}": Aggregator(
            job, store, actor_id=f"aggregator-{i}", secret=secret, evaluator=evaluator
        )
        for i in range(spec.actors.aggregator_count(spec.rounds))
    }

    def forward(aggregator_id: str, env: ReportEnvelope) -> None:
        agg = aggregators.get(aggregator_id)
        if agg is None or agg.stopped:
            raise ConnectionError(f"aggregator {aggregator_id} unreachable")
        if opts.adversary is not None:
            checkpoint = store.checkpoint(job.key)
            loaded = task_of(job)
            weights = (
                unpack_checkpoint(checkpoint_bytes(store, checkpoint), loaded.shapes)[0]
                if checkpoint is not None
                else loaded.initial
            )
            env = opts.adversary(env, weights)
        agg.accept(env)

    def forward_secagg(
        aggregator_id: str, round_key: str, device_id: str, ticket: str, step: str, body: bytes
    ) -> dict[str, Any] | None:
        agg = aggregators.get(aggregator_id)
        if agg is None or agg.stopped:
            raise ConnectionError(f"aggregator {aggregator_id} unreachable")
        return agg.secagg(round_key, device_id, ticket, step, body)

    selectors = [
        Selector(
            job,
            store,
            actor_id=f"selector-{i}",
            secret=secret,
            forward=forward,
            forward_secagg=forward_secagg,
        )
        for i in range(spec.actors.selectors)
    ]

    result = JobResult(job=job.name)
    last_wall = [time.perf_counter()]

    def on_attempt_end(end: AttemptEnd) -> None:
        now_wall = time.perf_counter()
        acc = end.metrics.get("accuracy")
        loss = end.metrics.get("loss")
        eps = end.metrics.get("epsilon")
        record = RoundRecord(
            round=end.round,
            selected=end.selected,
            reported=end.reported,
            dropped=end.dropped,
            abandoned=end.abandoned,
            accuracy=None if acc is None else float(acc),
            loss=None if loss is None else float(loss),
            seconds=now_wall - last_wall[0],
            sim_seconds=end.ended_at - end.opened_at,
            model_version=end.model_version,
            reason=end.reason,
            epsilon=None if eps is None else float(eps),
            device_metrics={} if end.abandoned else device_metrics(end.metrics),
        )
        last_wall[0] = now_wall
        if end.reason in ("job-finished", "job-failed"):
            return  # a pipelined selection cut short by the end of the job is not a round
        result.rounds.append(record)
        if progress is not None:
            progress.round_ended(record)

    coordinators = [
        Coordinator(
            job,
            store,
            actor_id=f"coordinator-{i}",
            settings=opts.settings,
            on_attempt_end=on_attempt_end,
        )
        for i in range(2 if opts.standby else 1)
    ]
    crashed: set[str] = set()

    def live_selectors() -> Sequence[SelectorPort]:
        return [s for s in selectors if not s.stopped]

    retire_at = [math.inf]
    """After the job ends its actors keep ticking a while (released devices go back to the
    population), then stop."""

    def tick() -> None:
        now = loop.now
        if now > retire_at[0]:
            return
        for agg in aggregators.values():
            agg.tick(now)
        for c in coordinators:
            if c.actor_id not in crashed:
                c.tick(now)
        for s in selectors:
            s.tick(now)
        loop.after(opts.tick_seconds, tick)

    def crash(actor: str) -> None:
        crashed.add(actor)
        for s in selectors:
            if s.actor_id == actor:
                s.stop()
        if actor in aggregators:
            aggregators[actor].stop()

    for fault in opts.faults:
        loop.at(fault.at, lambda a=fault.actor: crash(a))  # type: ignore[misc]

    def finished() -> bool:
        phase = store.job_state(job.key).get("phase")
        return phase in (JobPhase.succeeded.value, JobPhase.failed.value)

    policy = spec.rounds
    per_round = policy.selection_timeout_seconds + policy.reporting_timeout_seconds + 60
    limit = policy.total * per_round * 10 + 86_400

    loop.at(started_at, tick)
    fleet: SimulatedFleet | None = None
    if pop is None:
        fleet = SimulatedFleet(
            spec.fleet,
            spec.population,
            data,
            loop,
            live_selectors,
            policy=spec.eligibility,
            train_workers=train_workers(job, opts),
        )
        fleet.start()
    else:
        pop.jobs.append(job.key)
        pop.serve(live_selectors)
    try:
        loop.run_until(finished, limit=started_at + limit)
    finally:
        if fleet is not None:
            fleet.close()
    if pop is not None:
        pop.serve(tuple)
        retire_at[0] = (
            loop.now + policy.selection_timeout_seconds + policy.reporting_timeout_seconds
        )

    state = store.job_state(job.key)
    history = store.metrics(job.key)
    checkpoint = store.checkpoint(job.key)
    result.wall_seconds = time.perf_counter() - wall0
    result.sim_seconds = loop.now - started_at
    result.model_version = store.model_version(job.key)
    result.succeeded = state.get("phase") == JobPhase.succeeded.value
    result.reason = str(state.get("reason", "time-limit" if not result.succeeded else ""))
    if not result.succeeded:
        result.error = str(state.get("last_error", ""))
    if history:
        last = history[-1]
        result.final_metrics = numeric_metrics(last)
        result.final_accuracy = result.final_metrics.get("accuracy")
        result.final_loss = result.final_metrics.get("loss")
        eps, delta = history[-1].get("epsilon"), history[-1].get("delta")
        result.epsilon = None if eps is None else float(eps)
        result.delta = None if delta is None else float(delta)
    if checkpoint is not None:
        result.model_bytes = checkpoint_bytes(store, checkpoint)
    result.best_model = best_model_of(history, job.spec.checkpoints)
    if not math.isfinite(result.sim_seconds):
        result.sim_seconds = 0.0
    return result
