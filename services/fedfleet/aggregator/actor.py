"""The Aggregator actor and the per-round Master Aggregator.

Bonawitz et al. §4.2: Aggregators hold running partial sums in memory only; when the round
closes they hand them to the round's Master Aggregator, which combines them, applies the server
optimizer and commits the new checkpoint. Memory is O(model), never O(devices x model): an
update is validated and folded into a :class:`~fedfleet.core.aggregation.StreamingSum` the
moment it arrives, and then dropped.

Every update is checked before it can touch a sum — the device's ticket (HMAC over job, attempt
and device), the attempt's phase (late reports are stragglers and refused), one report per
device, the size limit, the encoding, shapes, dtype and finiteness — so a hostile or broken
report leaves the aggregate exactly as it was.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from fedfleet.core.aggregation import StreamingSum, UpdateRejected, validate_update
from fedfleet.core.checkpoint import pack_checkpoint
from fedfleet.core.models import Weights, weight_shapes
from fedfleet.core.optimizers import make_server_optimizer
from fedfleet.core.protocol import Phase, ReportEnvelope, ReportRejected, RoundState, verify_ticket
from fedfleet.core.roles import Role
from fedfleet.core.serde import SerdeError, decode_arrays
from fedfleet.core.spec import FLJob
from fedfleet.store.base import ConflictError, FencedError, Store
from fedfleet.store.checkpoints import CheckpointCache
from fedfleet.store.registration import Registration

__all__ = ["MAX_EXAMPLES_PER_REPORT", "Aggregator", "Evaluator"]

Evaluator = Callable[[Weights], dict[str, float]]
"""Server-side evaluation of a candidate model: returns metrics such as accuracy and loss."""

MAX_EXAMPLES_PER_REPORT = 1_000_000
"""A report's weight is its example count; larger claims are refused so one device cannot
dominate the average by lying about its data."""


class Aggregator:
    def __init__(
        self,
        job: FLJob,
        store: Store,
        *,
        actor_id: str,
        secret: bytes,
        evaluator: Evaluator | None = None,
        address: str = "",
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
        self._evaluator = evaluator
        self._shapes = weight_shapes(job.spec.model)
        self._max_bytes = job.spec.aggregation.max_update_bytes
        self._registration = Registration(
            store,
            self.name,
            Role.aggregator,
            actor_id,
            address,
            every=heartbeat_every,
            ttl=registration_ttl,
        )
        self._rounds: dict[str, RoundState] = {}
        self._sums: dict[str, StreamingSum] = {}
        self._seen: dict[str, set[str]] = defaultdict(set)
        self._published: set[str] = set()
        self._committed: set[str] = set()
        self._checkpoints = CheckpointCache(store, job)
        self._lock = threading.Lock()
        self.stopped = False
        self.last_commit_error = ""

    # -- reports ---------------------------------------------------------------------------------
    def accept(self, env: ReportEnvelope) -> None:
        """Validate and fold in one report, or raise :class:`ReportRejected`."""
        if self.stopped:
            raise ConnectionError("aggregator is down")
        state = self._rounds.get(env.round_key)
        if state is None or state.phase in (Phase.selecting, Phase.waiting):
            # A device can train and report before this aggregator's next tick has seen its
            # round configured: look again in the store before refusing (miss path only).
            state = self._refresh_round(env.round_key)
        if state is None:
            raise ReportRejected(404, f"unknown round {env.round_key!r}")
        if state.phase is not Phase.reporting or env.round_key in self._published:
            raise ReportRejected(409, f"round {env.round_key} is closed ({state.phase.value})")
        if self.actor_id not in state.aggregators:
            raise ReportRejected(421, "this aggregator does not serve that round")
        if not verify_ticket(self._secret, self.name, env.round_key, env.device_id, env.ticket):
            raise ReportRejected(403, "invalid report ticket")
        if not 0 < env.num_examples <= MAX_EXAMPLES_PER_REPORT:
            raise ReportRejected(422, f"num_examples must be in 1..{MAX_EXAMPLES_PER_REPORT}")
        if len(env.update) > self._max_bytes:
            raise ReportRejected(413, f"update exceeds {self._max_bytes} bytes")
        try:
            # Zero-copy, aligned, read-only views: the update is read twice (finiteness, then
            # the weighted fold) and never kept, so copying it would be a third pass for nothing.
            update = decode_arrays(
                env.update, max_bytes=self._max_bytes, expected_shapes=self._shapes, copy=False
            )
            validate_update(update, self._shapes)
        except (SerdeError, UpdateRejected) as exc:
            raise ReportRejected(422, f"update refused: {exc}") from None
        key, device = env.round_key, env.device_id
        with self._lock:
            if device in self._seen[key]:
                raise ReportRejected(409, "this device already reported for this round")
            self._seen[key].add(device)  # reserved: a concurrent duplicate is refused
        try:
            # Only a valid update may take one of the round's K slots; folding it in cannot fail.
            claimed = self.store.claim_report(self.name, key, self.actor_id, state.goal)
        except BaseException:
            with self._lock:
                self._seen[key].discard(device)
            raise
        with self._lock:
            if not claimed:
                self._seen[key].discard(device)
                raise ReportRejected(409, f"round {key} already has its reports")
            if key in self._published:
                raise ReportRejected(409, f"round {key} closed while the report arrived")
            acc = self._sums.get(key)
            if acc is None:
                acc = self._sums[key] = StreamingSum(self._shapes)
            acc.add(update, float(env.num_examples), validated=True)

    def _refresh_round(self, round_key: str) -> RoundState | None:
        fresh = {r.key: r for r in self.store.rounds(self.name)}
        with self._lock:
            self._rounds = fresh
        return fresh.get(round_key)

    def partial(self, round_key: str) -> StreamingSum | None:
        return self._sums.get(round_key)

    # -- timer -------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if self.stopped:
            return
        self._registration.beat(now)
        rounds = {r.key: r for r in self.store.rounds(self.name)}
        to_publish: list[tuple[str, bytes]] = []
        with self._lock:
            self._rounds = rounds
            for key, state in rounds.items():
                if state.phase is Phase.closing and self.actor_id in state.aggregators:
                    if key not in self._published:
                        acc = self._sums.get(key) or StreamingSum(self._shapes)
                        to_publish.append((key, acc.to_bytes()))
                        self._published.add(key)
            for key in list(self._sums):
                st = rounds.get(key)
                if st is None or not st.active:
                    self._forget(key)
        for key, data in to_publish:
            self.store.put_partial(self.name, key, self.actor_id, data)
        for key, state in rounds.items():
            if (
                state.phase is Phase.closing
                and state.master == self.actor_id
                and key not in self._committed
            ):
                self._try_commit(state, now)

    def _forget(self, key: str) -> None:
        self._sums.pop(key, None)
        self._seen.pop(key, None)
        self._published.discard(key)
        self._committed.discard(key)

    # -- master aggregator ---------------------------------------------------------------------
    def _try_commit(self, state: RoundState, now: float) -> None:
        partials = self.store.partials(self.name, state.key)
        live = self.store.members(self.name, Role.aggregator)
        expected = [a for a in state.aggregators if a in live]
        grace_over = now >= state.closing_deadline - self._commit_grace(state)
        if any(a not in partials for a in expected) and not grace_over:
            return
        total = StreamingSum(self._shapes)
        for data in partials.values():
            total.merge(StreamingSum.from_bytes(data, self._shapes))
        self._committed.add(state.key)
        if total.count < state.minimum:
            self.last_commit_error = (
                f"{total.count} reports reached the master, need {state.minimum}"
            )
            return
        try:
            self._commit(state, total)
        except (FencedError, ConflictError, ValueError) as exc:
            self.last_commit_error = str(exc)

    def _commit_grace(self, state: RoundState) -> float:
        """Wait at most half the commit window for partial sums of aggregators that vanished."""
        return (
            (state.closing_deadline - state.reporting_deadline) / 2
            if state.reporting_deadline
            else 0.0
        )

    def _commit(self, state: RoundState, total: StreamingSum) -> None:
        weights, opt_state = self._checkpoints.load(state.model_version)
        optimizer = make_server_optimizer(self.spec.aggregation, self._shapes)
        if opt_state:
            optimizer.load_state(opt_state)
        new = optimizer.step(weights, total.mean())
        metrics: dict[str, Any] = {"reports": total.count, "examples": total.total_weight}
        if self._evaluator is not None:
            metrics.update(self._evaluator(new))
        self.store.commit_checkpoint(
            self.name,
            state.token,
            state.model_version,
            state.round,
            pack_checkpoint(new, optimizer.state()),
            metrics,
        )

    def stop(self) -> None:
        """Crash semantics: partial sums held in memory are lost."""
        self.stopped = True
        with self._lock:
            self._sums.clear()
