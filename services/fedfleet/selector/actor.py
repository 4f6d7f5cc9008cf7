"""The Selector actor: check-ins decided locally, configuration, report forwarding.

Bonawitz et al. §4.2: Selectors accept device connections and decide locally — against a
quota the Coordinator pushes in batches — which devices join the next round; every other
device gets a reconnect window from pace steering. A check-in never touches the store: the
quota, the round states and the checkpoint are refreshed on :meth:`Selector.tick`, and counts of
selections and drop-outs go back to the store in batches on the same tick.

Selected devices wait (their connection is held as a :class:`DeviceLink`) until their attempt
is configured, which happens after the previous round commits (pipelining); then each gets a
:class:`Task` with the plan and the checkpoint it trains from.
"""

from __future__ import annotations

import threading
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fedfleet.core.eligibility import is_eligible
from fedfleet.core.models import Weights
from fedfleet.core.pacing import PaceSteering
from fedfleet.core.protocol import (
    Assignment,
    CheckIn,
    Phase,
    PrivacyPlan,
    Quota,
    Reconnect,
    ReportEnvelope,
    ReportRejected,
    RoundState,
    Task,
    attempt_key,
    report_ticket,
    secagg_group_id,
    verify_ticket,
)
from fedfleet.core.roles import Role
from fedfleet.core.spec import FLJob
from fedfleet.store.base import Store
from fedfleet.store.checkpoints import CheckpointCache
from fedfleet.store.registration import Registration
from fedfleet.tasks import task_of

__all__ = ["DeviceLink", "Forward", "ForwardSecAgg", "Selector"]


class DeviceLink(Protocol):
    """A held device connection: the selector configures or releases the device through it."""

    def configure(self, task: Task) -> None: ...

    def release(self, reconnect: Reconnect) -> None: ...


Forward = Callable[[str, ReportEnvelope], None]
"""Deliver a report to the named aggregator; raises ReportRejected (or ConnectionError)."""

AsyncForward = Callable[[str, ReportEnvelope], Awaitable[None]]
"""The same from the service's event loop (the selector service forwards uploads this way)."""

ForwardSecAgg = Callable[[str, str, str, str, str, bytes], dict[str, Any] | None]
"""Deliver one Secure Aggregation call ``(aggregator, round_key, device_id, ticket, step, body)``
to the named aggregator and return its answer (see :meth:`Aggregator.secagg`)."""


class Selector:
    def __init__(
        self,
        job: FLJob,
        store: Store,
        *,
        actor_id: str,
        secret: bytes,
        forward: Forward | None = None,
        forward_secagg: ForwardSecAgg | None = None,
        aforward: AsyncForward | None = None,
        address: str = "",
        pacing: PaceSteering | None = None,
        heartbeat_every: float = 2.0,
        registration_ttl: float = 10.0,
    ) -> None:
        self.job = job
        self.name = job.key
        self.spec = job.spec
        self.store = store
        self.actor_id = actor_id
        self.address = address
        self._secret = secret
        if forward is None and aforward is None:
            raise ValueError("a selector needs a way to forward reports")
        self._forward = forward
        self._aforward = aforward
        self._forward_secagg = forward_secagg
        self._offset = zlib.crc32(actor_id.encode())
        self.pacing = pacing or PaceSteering()
        self._registration = Registration(
            store,
            self.name,
            Role.selector,
            actor_id,
            address,
            every=heartbeat_every,
            ttl=registration_ttl,
        )
        self._quota: Quota | None = None
        self._last_attempt = 0
        """The latest attempt a quota named (pace steering sends devices to the next)."""
        self._selected: dict[str, int] = defaultdict(int)
        """Devices this selector selected per attempt (exact; the store's count lags)."""
        self._chosen: dict[str, set[str]] = defaultdict(set)
        """Devices this selector selected, per attempt."""
        self._settled: dict[str, set[str]] = defaultdict(set)
        """Devices that reported or were counted as dropped, per attempt."""
        self._rounds: dict[str, RoundState] = {}
        self._waiting: dict[str, dict[str, tuple[DeviceLink, Assignment]]] = defaultdict(dict)
        self._unflushed: dict[tuple[str, str], int] = defaultdict(int)
        self._checkpoints = CheckpointCache(store, job, task_of(job).initial)
        self._lock = threading.Lock()
        self.stopped = False
        self.wake: Callable[[], None] | None = None
        """Asks for a tick now (the service's ticker): called when this selector selected a
        device or a selected device dropped, so the counts reach the store at once (from the
        ticker's thread; a burst of selections is still one flush) instead of on the next
        timer tick. Check-ins that end in a reconnect window never call it."""

    # -- device API (local decisions only) -------------------------------------------------------
    def check_in(self, msg: CheckIn, now: float, link: DeviceLink) -> Assignment | Reconnect:
        """Decide one check-in locally: an assignment within quota, else a reconnect window."""
        with self._lock:
            self.pacing.observe(now)
            quota = self._quota
            share = quota.round_share if quota else 1
            next_open = quota.next_open if quota else now
            pace = quota.round_seconds if quota else 0.0
            if quota is not None and quota.attempt > self._last_attempt:
                self._last_attempt = quota.attempt
            # The attempt whose selection opens next: the one after the one open now (this
            # device is not taken by it), or after the last one this selector saw.
            upcoming = self._last_attempt + 1 if self._last_attempt else 0
            if msg.population != self.spec.population:
                return Reconnect(now + 3600.0, now + 7200.0, "unknown-population")
            if not is_eligible(self.spec.eligibility, msg):
                return self.pacing.window(
                    now,
                    round_share=share,
                    next_open=next_open,
                    reason="ineligible",
                    round_seconds=pace,
                )
            state = self._room(quota)
            if state is not None and quota is not None:
                return self._select(msg.device_id, state, quota, link)
            return self.pacing.window(
                now,
                round_share=share,
                next_open=next_open,
                round_seconds=pace,
                device_id=msg.device_id,
                next_attempt=upcoming,
                next_opening=quota.next_opening if quota else 0.0,
            )

    def _room(self, quota: Quota | None) -> RoundState | None:
        """The round this selector may add a device to now, if any (under the lock)."""
        if quota is None or not quota.aggregators:
            return None
        key = attempt_key(quota.attempt)
        state = self._rounds.get(key)
        if (
            state is not None
            and state.phase is Phase.selecting
            and self._selected[key] - quota.counted < quota.count
        ):
            return state
        return None

    def has_room(self) -> bool:
        """Would a check-in now be selected (the round is selecting and the quota not used
        up)? What the population's gateway is told (fedfleet.gateway.routes)."""
        with self._lock:
            return self._room(self._quota) is not None

    def _select(
        self, device_id: str, state: RoundState, quota: Quota, link: DeviceLink
    ) -> Assignment:
        waiting = self._waiting[state.key]
        if device_id in waiting:
            return waiting[device_id][1]
        aggs = quota.aggregators
        # Round-robin over the attempt's aggregators, offset per selector so that several
        # selectors do not all start on the same one: groups stay balanced, which Secure
        # Aggregation needs (a group below its minimum size fails the round).
        aggregator = aggs[(self._selected[state.key] + self._offset) % len(aggs)]
        ticket = report_ticket(self._secret, self.name, state.key, device_id)
        assignment = Assignment(state.key, aggregator, ticket)
        waiting[device_id] = (link, assignment)
        self._selected[state.key] += 1
        self._chosen[state.key].add(device_id)
        self._unflushed[(state.key, "selected")] += 1
        if self.wake is not None:  # the count reaches the store from the ticker's thread
            self.wake()
        return assignment

    def ticket_ok(self, round_key: str, device_id: str, ticket: str) -> bool:
        return verify_ticket(self._secret, self.name, round_key, device_id, ticket)

    def report(self, env: ReportEnvelope, aggregator: str) -> None:
        """Hand a device's report to its aggregator (raises ReportRejected)."""
        if self._forward is None:
            raise ConnectionError("this selector forwards reports from its event loop")
        self._route_report(env, aggregator)
        self._forward(aggregator, env)
        self._reported(env)

    async def areport(self, env: ReportEnvelope, aggregator: str) -> None:
        """:meth:`report` from the service's event loop (no thread hop, no blocking client)."""
        if self._aforward is None:
            raise ConnectionError("this selector forwards reports synchronously")
        self._route_report(env, aggregator)
        await self._aforward(aggregator, env)
        self._reported(env)

    def _route_report(self, env: ReportEnvelope, aggregator: str) -> None:
        if self.stopped:
            raise ConnectionError("selector is down")
        self._check_route(env.round_key, aggregator)

    def _reported(self, env: ReportEnvelope) -> None:
        with self._lock:
            self._settled[env.round_key].add(env.device_id)

    def secagg(
        self, aggregator: str, round_key: str, device_id: str, ticket: str, step: str, body: bytes
    ) -> dict[str, Any] | None:
        """Relay one Secure Aggregation call to the device's aggregator (tickets are checked
        here first, so a forged call never reaches it)."""
        if self.stopped:
            raise ConnectionError("selector is down")
        if self._forward_secagg is None:
            raise ReportRejected(404, "this selector does not relay secure aggregation")
        if not self.ticket_ok(round_key, device_id, ticket):
            raise ReportRejected(403, "invalid ticket for this device and round")
        self._check_route(round_key, aggregator)
        answer = self._forward_secagg(aggregator, round_key, device_id, ticket, step, body)
        if step == "advertise":
            with self._lock:
                self._settled[round_key].add(device_id)
        return answer

    def _check_route(self, round_key: str, aggregator: str) -> None:
        """Refuse (421) a message addressed to an aggregator its round does not use: that is
        the device's mistake, not an outage it should wait out."""
        state = self._rounds.get(round_key)
        if state is not None and aggregator not in state.aggregators:
            raise ReportRejected(421, f"aggregator {aggregator!r} does not serve round {round_key}")

    def dropped(self, round_key: str, device_id: str) -> bool:
        """A selected device was lost: it aborted its task or its connection closed.

        The abort is recorded in the store first (:meth:`Store.claim_abort`, atomic with the
        aggregators' report claims), so the device can no longer report to any aggregator of
        the round, and it is counted only when this is the first record of it: once per
        attempt and device whichever selector hears it, never for a device that reported, so
        repeating an abort cannot talk a round into abandonment. Raises StoreUnavailable when
        the store cannot record it (the device retries).
        """
        with self._lock:
            if device_id in self._settled.get(round_key, ()):
                return False
            if device_id not in self._chosen.get(round_key, ()) and round_key not in self._rounds:
                return False  # not a live attempt: there is nothing left to bar
        recorded = self.store.claim_abort(self.name, round_key, device_id)
        with self._lock:
            settled = self._settled[round_key]
            if device_id in settled:
                return False
            settled.add(device_id)
            self._waiting.get(round_key, {}).pop(device_id, None)
            if not recorded:  # it reported (or aborted) through another selector
                return False
            self._unflushed[(round_key, "dropped")] += 1
        if self.wake is not None:
            self.wake()
        return True

    def checkpoint(self, version: int) -> tuple[Weights, bytes]:
        """The model at ``version`` and its encoded form (for downloads); ValueError if gone."""
        return self._checkpoints.weights(version), self._checkpoints.encoded(version)

    def round_state(self, round_key: str) -> RoundState | None:
        return self._rounds.get(round_key)

    # -- timer -------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Batch exchange with the store: heartbeat, counts out, quota and rounds in.

        Store I/O happens outside the lock so check-ins never wait on the network.
        """
        if self.stopped:
            return
        with self._lock:
            unflushed, self._unflushed = self._unflushed, defaultdict(int)
        try:
            self._registration.beat(now)
            for (key, kind), n in unflushed.items():
                if n:
                    self.store.add_count(self.name, key, kind, self.actor_id, n)
                    unflushed[(key, kind)] = 0
            quota = self.store.quota(self.name, self.actor_id)
            rounds = {r.key: r for r in self.store.rounds(self.name)}
        except Exception:
            with self._lock:  # keep what was not flushed for the next tick
                for k, n in unflushed.items():
                    self._unflushed[k] += n
            raise
        with self._lock:
            self._quota, self._rounds = quota, rounds
            for per in (self._selected, self._chosen, self._settled):
                for key in [k for k in per if k not in rounds]:
                    del per[key]
            ready = self._take_settled(rounds)
            if quota is not None:
                self.pacing.update(now, quota.checkin_rate)
        self._configure_or_release(ready, now)

    def _take_settled(
        self, rounds: dict[str, RoundState]
    ) -> list[tuple[RoundState | None, list[tuple[DeviceLink, Assignment]]]]:
        ready = []
        for key in list(self._waiting):
            state = rounds.get(key)
            if state is not None and state.phase in (Phase.selecting, Phase.waiting):
                continue
            ready.append((state, list(self._waiting.pop(key).values())))
        return ready

    def _configure_or_release(
        self,
        ready: list[tuple[RoundState | None, list[tuple[DeviceLink, Assignment]]]],
        now: float,
    ) -> None:
        for state, devices in ready:
            if state is not None and state.phase is Phase.reporting:
                weights = self._checkpoints.weights(state.model_version)
                for link, assignment in devices:
                    group = secagg_group_id(self.name, assignment.round_key, assignment.aggregator)
                    link.configure(
                        Task(
                            assignment,
                            self.spec.effective_task,
                            self.spec.plan,
                            state.model_version,
                            weights,
                            PrivacyPlan.for_group(self.spec.aggregation, group),
                            self.spec.evaluation.federated,
                        )
                    )
            else:
                next_open = self._quota.next_open if self._quota else now
                window = Reconnect(max(now, next_open), max(now, next_open) + 10.0, "round-ended")
                for link, _ in devices:
                    link.release(window)

    def stop(self) -> None:
        """Crash semantics: held devices are lost with the selector's memory."""
        self.stopped = True
        with self._lock:
            self._waiting.clear()
