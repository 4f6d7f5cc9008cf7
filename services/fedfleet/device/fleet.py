"""The fleet simulator: many devices with real data, daily availability and drop-outs.

Each simulated device owns a shard of a real dataset (an :class:`ArrayExamples` store) and an
:class:`~fedfleet.device.runtime.FLRuntime`. Its conditions follow the fleet's daily
availability curve: at time t it is charging, idle and unmetered with probability p(t), which
swings between the curve's trough and peak. A configured device drops out with the fleet's
drop-out rate by losing eligibility partway through its task, which the runtime notices and
aborts on. The simulator talks to selectors through the :class:`SelectorPort` protocol.

With Secure Aggregation on, a trained device then walks the protocol's calls through its
selector (:class:`~fedfleet.device.secure.SecureSession`), polling every ``poll_seconds``; a
device that drops out does so at a uniformly chosen point: during training, or after its key
advertisement, its shares or its masked input — exactly the drop-outs the protocol recovers
from.

With ``train_workers`` above 1, the devices a selector configures together train at once in a
thread pool (for tasks whose training runs outside the GIL, such as PyTorch's kernels): each
device's training starts when it is configured and its outcome is taken when its report (or
drop-out) falls due on the simulated clock. Every device trains with its own generator and
the events keep their order, so the run is the same as with one worker, only sooner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from fedfleet.core.protocol import (
    Assignment,
    CheckIn,
    Reconnect,
    ReportEnvelope,
    ReportRejected,
    Task,
)
from fedfleet.core.secagg import SecAggError
from fedfleet.core.spec import EligibilitySpec, FleetSpec
from fedfleet.device.datasets import DatasetSplit
from fedfleet.device.runtime import (
    ArrayExamples,
    DeviceConditions,
    FLRuntime,
    SecureContribution,
    TaskAborted,
)
from fedfleet.device.secure import SecureSession
from fedfleet.device.simloop import SimLoop
from fedfleet.device.userdata import take
from fedfleet.selector.actor import DeviceLink

__all__ = ["FleetStats", "SelectorPort", "SimulatedFleet", "availability"]


class SelectorPort(Protocol):
    def check_in(self, msg: CheckIn, now: float, link: DeviceLink) -> Assignment | Reconnect: ...

    def report(self, env: ReportEnvelope, aggregator: str) -> None: ...

    def dropped(self, round_key: str, device_id: str) -> bool: ...

    def secagg(
        self, aggregator: str, round_key: str, device_id: str, ticket: str, step: str, body: bytes
    ) -> dict[str, Any] | None: ...


def availability(spec: FleetSpec, now: float) -> float:
    """Probability that a device is eligible at ``now`` (cosine daily curve)."""
    a = spec.availability
    phase = 2 * math.pi * (now - a.peak_at_seconds) / a.period_seconds
    return a.trough + (a.peak - a.trough) * (1 + math.cos(phase)) / 2


class FleetStats:
    def __init__(self) -> None:
        self.checkins = 0
        self.selected = 0
        self.reported = 0
        self.aborted = 0
        self.refused = 0
        self.connection_errors = 0
        self.secagg_aborts = 0
        """Secure aggregation sessions a device refused to continue (a bad roster or share)."""


class _Device:
    __slots__ = ("assignment", "fleet", "runtime", "selector")

    def __init__(self, fleet: SimulatedFleet, runtime: FLRuntime) -> None:
        self.fleet = fleet
        self.runtime = runtime
        self.assignment: Assignment | None = None
        self.selector: SelectorPort | None = None
        """The selector holding this device's connection while it is selected."""

    # DeviceLink ----------------------------------------------------------------------------
    def configure(self, task: Task) -> None:
        self.fleet._configured(self, task)

    def release(self, reconnect: Reconnect) -> None:
        self.assignment = None
        self.selector = None
        self.fleet._schedule_wake(self, self.runtime.on_reconnect(reconnect))


class SimulatedFleet:
    def __init__(
        self,
        spec: FleetSpec,
        population: str,
        data: DatasetSplit,
        loop: SimLoop,
        selectors: Callable[[], Sequence[SelectorPort]],
        *,
        policy: EligibilitySpec | None = None,
        recheck_seconds: float = 60.0,
        poll_seconds: float = 1.0,
        train_workers: int = 1,
    ) -> None:
        self.spec = spec
        self._pool = (
            ThreadPoolExecutor(train_workers, thread_name_prefix="sim-train")
            if train_workers > 1
            else None
        )
        self.loop = loop
        self.poll_seconds = poll_seconds
        self.selectors = selectors
        self.recheck_seconds = recheck_seconds
        self.rng = np.random.default_rng(spec.seed + 1)
        self.stats = FleetStats()
        self.devices: list[_Device] = []
        for i, idx in enumerate(data.shards):
            examples = ArrayExamples(take(data.train, idx))
            runtime = FLRuntime(
                f"dev-{i:06d}",
                population,
                examples,
                policy=policy,
                rng=np.random.default_rng([spec.seed, i]),
            )
            self.devices.append(_Device(self, runtime))

    def close(self) -> None:
        """Drop trainings not started yet and wait for the running ones (at most one per
        worker): a finished job leaves no training behind."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _train(
        self, run: Callable[[], ReportEnvelope | SecureContribution]
    ) -> Callable[[], ReportEnvelope | SecureContribution]:
        """Start ``run`` (one device's training) and return what yields its outcome (or
        raises its error): at once without a pool, else when the pool has run it."""
        if self._pool is None:
            try:
                done: ReportEnvelope | SecureContribution = run()
            except TaskAborted as exc:
                failed = exc

                def fail() -> ReportEnvelope | SecureContribution:
                    raise failed

                return fail
            return lambda: done
        future: Future[ReportEnvelope | SecureContribution] = self._pool.submit(run)
        return future.result

    def start(self, spread: float = 30.0) -> None:
        """First check-ins spread over ``spread`` seconds."""
        for dev, t in zip(
            self.devices, self.rng.uniform(0, spread, len(self.devices)), strict=True
        ):
            self._schedule_wake(dev, float(t))

    def _schedule_wake(self, dev: _Device, when: float) -> None:
        self.loop.at(when, lambda: self._wake(dev))

    def _conditions(self, now: float) -> DeviceConditions:
        if self.rng.random() < availability(self.spec, now):
            return DeviceConditions(True, True, True)
        which = int(self.rng.integers(3))
        return DeviceConditions(which != 0, which != 1, which != 2)

    def _wake(self, dev: _Device) -> None:
        now = self.loop.now
        if dev.assignment is not None:
            return
        conditions = self._conditions(now)
        if not dev.runtime.should_check_in(conditions, now):
            self._schedule_wake(
                dev,
                max(
                    now + self.recheck_seconds * self.rng.uniform(0.5, 1.5),
                    dev.runtime.next_checkin,
                ),
            )
            return
        live = self.selectors()
        if not live:
            self._schedule_wake(dev, now + self.rng.uniform(5, 15))
            return
        selector = live[int(self.rng.integers(len(live)))]
        self.stats.checkins += 1
        try:
            answer = selector.check_in(dev.runtime.checkin(conditions, now), now, dev)
        except ConnectionError:
            self.stats.connection_errors += 1
            self._schedule_wake(dev, now + self.rng.uniform(5, 15))
            return
        if isinstance(answer, Reconnect):
            self._schedule_wake(dev, dev.runtime.on_reconnect(answer))
        else:
            dev.assignment = answer
            dev.selector = selector
            self.stats.selected += 1

    def _configured(self, dev: _Device, task: Task) -> None:
        now = self.loop.now
        selector, dev.selector, dev.assignment = dev.selector, None, None
        duration = float(self.rng.lognormal(math.log(self.spec.train_seconds), 0.35))
        drops = self.rng.random() < self.spec.dropout_rate
        epochs = task.plan.local_epochs
        lost_at = int(self.rng.integers(0, epochs)) if drops else epochs + 1
        secure = task.privacy is not None and task.privacy.secure_aggregation
        # Under secure aggregation a drop-out falls in training or after one of the first
        # three messages (advertise, shares, masked input), each equally likely.
        stop_after = 99
        if drops and secure:
            stage = int(self.rng.integers(0, 4))
            if stage > 0:
                lost_at, stop_after = epochs + 1, stage
        outcome = self._train(lambda: dev.runtime.execute(task, now, lambda epoch: epoch < lost_at))
        # An aborted task is noticed (lost_at + 1/2) / epochs of the way through; a trained one
        # reports after ``duration``. The outcome is taken at the earlier of the two.
        abort_after = duration * (lost_at + 0.5) / max(1, epochs)
        decide_after = min(duration, abort_after)

        def abort() -> None:
            if selector is not None:
                try:
                    selector.dropped(task.assignment.round_key, dev.runtime.device_id)
                except ConnectionError:
                    pass
            self._schedule_wake(dev, self.loop.now + self.recheck_seconds)

        def decide() -> None:
            try:
                env = outcome()
            except TaskAborted:
                self.stats.aborted += 1
                self._later(abort_after - decide_after, abort)
                return
            if isinstance(env, SecureContribution):
                contribution = env
                self._later(
                    duration - decide_after,
                    lambda: self._secure(dev, selector, contribution, stop_after),
                )
                return
            self._later(duration - decide_after, lambda: report(env))

        def report(report_env: ReportEnvelope) -> None:
            if selector is None:
                return
            try:
                selector.report(report_env, task.assignment.aggregator)
                self.stats.reported += 1
            except ReportRejected:
                self.stats.refused += 1
            except ConnectionError:
                self.stats.connection_errors += 1
            self._schedule_wake(dev, self.loop.now + self.rng.uniform(30, 90))

        self.loop.after(decide_after, decide)

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` after ``delay`` simulated seconds; at once (in the current event) when
        the delay is zero, so an outcome taken when it falls due keeps its event's place."""
        if delay > 0:
            self.loop.after(delay, fn)
        else:
            fn()

    def _secure(
        self,
        dev: _Device,
        selector: SelectorPort | None,
        contribution: SecureContribution,
        stop_after: int,
        max_polls: int = 3600,
    ) -> None:
        """Walk one device through its Secure Aggregation session on simulated time."""
        c = contribution
        session = SecureSession(c)
        sent = 0
        polls = 0

        def finish() -> None:
            self._schedule_wake(dev, self.loop.now + self.rng.uniform(30, 90))

        def call(step: str, body: bytes) -> dict[str, Any] | None:
            assert selector is not None
            return selector.secagg(c.aggregator, c.round_key, c.device_id, c.ticket, step, body)

        def send(step: str, body: bytes) -> None:
            nonlocal sent
            try:
                call(step, body)
            except ReportRejected:
                self.stats.refused += 1
                finish()
                return
            except ConnectionError:
                self.stats.connection_errors += 1
                finish()
                return
            session.sent(step)
            sent += 1
            if step == "advertise":
                self.stats.reported += 1
            if session.done or sent >= stop_after:
                finish()
                return
            self.loop.after(self.poll_seconds, poll)

        def poll() -> None:
            nonlocal polls
            polls += 1
            assert session.poll is not None
            try:
                published = call(session.poll, b"")
            except (ReportRejected, ConnectionError):
                finish()  # the session ended without this device (it missed a phase)
                return
            if published is None:
                if polls < max_polls:
                    self.loop.after(self.poll_seconds, poll)
                else:
                    finish()
                return
            try:
                step, body = session.answer(published)
            except SecAggError:
                self.stats.secagg_aborts += 1
                finish()
                return
            send(step, body)

        if selector is None:
            return
        send(*session.start())
