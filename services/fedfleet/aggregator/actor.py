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

Privacy (``aggregation.secureAggregation`` / ``aggregation.differentialPrivacy``):

* With Secure Aggregation on, plain reports are refused. Each aggregator runs one session of
  :mod:`fedfleet.core.secagg` per round over the devices that advertised keys to it (each
  advertisement takes one of the round's K report slots). When the round closes, the session
  walks its remaining phases — each ends when every member answered or after
  ``phaseTimeoutSeconds`` — and its unmasked group sum becomes this aggregator's partial sum.
  A group that fails (below its threshold) publishes a failure marker
  (:data:`~fedfleet.core.protocol.SECAGG_FAILED`): the master commits nothing for that round
  and the coordinator abandons it.
* With DP on, a report's weight is capped and (without secure aggregation) its update is
  clipped on receipt; the master adds Gaussian noise of standard deviation z x S to the merged
  sum before averaging and records the accountant's epsilon with the commit.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from fedfleet.core.aggregation import StreamingSum, UpdateRejected, validate_update
from fedfleet.core.autoscale import LoadWindow, update_bytes
from fedfleet.core.checkpoint import pack_checkpoint
from fedfleet.core.commitcheck import (
    COMMIT_ERROR_FIELD,
    COMMIT_REFUSED_COUNT,
    CommitRefused,
    check_commit,
)
from fedfleet.core.dp import PrivacyAccountant, capped_weight, clip_update, noise_rng, noise_stddev
from fedfleet.core.influence import BoundedFold, InfluenceHistory, RobustFold, make_fold
from fedfleet.core.metrics import MetricsRejected, MetricSums, validate_metrics
from fedfleet.core.models import Weights
from fedfleet.core.optimizers import make_server_optimizer
from fedfleet.core.privacy import metrics_from_secagg, secagg_params, sum_from_secagg
from fedfleet.core.protocol import (
    SECAGG_FAILED,
    SECAGG_STEPS,
    Phase,
    PrivacyPlan,
    ReportEnvelope,
    ReportRejected,
    RoundState,
    secagg_group_id,
    secagg_message_limit,
    verify_ticket,
)
from fedfleet.core.roles import Role
from fedfleet.core.secagg import (
    REASON_DUPLICATE,
    REASON_PHASE,
    REASON_UNKNOWN,
    KeyAdvert,
    MaskedInput,
    SecAggFailed,
    SecAggRejected,
    SecAggServer,
    ServerPhase,
    ShareKeys,
    UnmaskShares,
)
from fedfleet.core.serde import SerdeError, decode_arrays
from fedfleet.core.spec import FLJob
from fedfleet.store.base import Claim, ConflictError, FencedError, Store, StoreUnavailable
from fedfleet.store.checkpoints import CheckpointCache
from fedfleet.store.history import ModelStorage, commit_model, storage_for
from fedfleet.store.registration import Registration
from fedfleet.tasks import task_of

log = logging.getLogger("fedfleet.aggregator")

__all__ = ["MAX_EXAMPLES_PER_REPORT", "Aggregator", "Evaluator"]

Evaluator = Callable[[Weights], dict[str, float]]
"""Server-side evaluation of a candidate model: returns metrics such as accuracy and loss."""

MAX_EXAMPLES_PER_REPORT = 1_000_000
"""Default of ``aggregation.robustness.maxExamplesPerReport``: larger claims are refused. The
weight a report gets is bounded further by what the population reports
(:mod:`fedfleet.core.influence`)."""


class _Session:
    """One aggregator group's Secure Aggregation session; its lock orders every step."""

    __slots__ = ("deadline", "error", "group", "lock", "metrics", "partial", "plan", "server")

    def __init__(self, server: SecAggServer, group: str, plan: PrivacyPlan) -> None:
        self.server = server
        self.group = group
        self.plan = plan
        self.metrics: bytes | None = None
        """The group's device metrics (sums inside the masked vector), once it has a sum."""
        self.lock = threading.Lock()
        self.deadline = 0.0
        """When the current phase after key advertisement must close."""
        self.partial: bytes | None = None
        """What to publish once the session ended (the sum, or a failure marker)."""
        self.error = ""


METRICS_PARTIAL = "#metrics"
"""Suffix of the partial an aggregator publishes, next to its sum, with its device metrics."""


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
        self._task = task_of(job)
        self._shapes = self._task.shapes
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
        """Private jobs' sums (DP-clipped, capped weights)."""
        self._folds: dict[str, BoundedFold | RobustFold] = {}
        """Plain jobs' folds, each report's weight and norm bounded by the history's."""
        self._seen: dict[str, set[str]] = defaultdict(set)
        self._published: set[str] = set()
        self._inflight: dict[str, int] = defaultdict(int)
        """Reports past their checks and not yet folded in, per round: a round's partial sum
        is not published while one is, so a report that took one of the round's K slots in
        the store is always in the sum (the store counts it; the master must see it)."""
        self.wake: Callable[[], None] | None = None
        """Asks for a tick now (the service's ticker): a partial held back for a report in
        flight is published as soon as the report is folded in."""
        self._committed: set[str] = set()
        self._checkpoints = CheckpointCache(store, job, self._task.initial)
        self._models: ModelStorage | None = None
        """Where committed models go (spec.checkpoints.storage), opened at the first commit."""
        self._metrics: dict[str, MetricSums] = {}
        """Per round, the device-reported metrics' running sums (with secure aggregation each
        session's ``metrics`` instead: sums from inside the masked vector)."""
        self._lock = threading.Lock()
        self.stopped = False
        self.last_commit_error = ""
        agg = job.spec.aggregation
        self._private = agg.private
        self._weight_cap = agg.example_weight_cap
        self._secagg = agg.secure_aggregation
        self._dp = agg.differential_privacy
        self._clip = self._dp.clip_norm if self._dp.enabled else None
        self._robust = agg.robustness
        self._history = InfluenceHistory(agg.robustness.history_window)
        self._sessions: dict[str, _Session] = {}
        self._secagg_limit = secagg_message_limit(agg)
        self._now = 0.0
        """The time of the last tick: the clock of session deadlines set between ticks."""
        self._accountant = (
            PrivacyAccountant(
                noise_multiplier=self._dp.noise_multiplier,
                sampling_probability=job.spec.dp_sampling_probability,
                delta=self._dp.delta,
                method=self._dp.accountant,
            )
            if self._dp.enabled
            else None
        )
        self._noise = noise_rng() if self._dp.enabled else None
        self._load = LoadWindow()
        """Recent reports' bytes and fold times: the load published for the pool's sizing."""
        self._load_every = heartbeat_every
        self._load_published = float("-inf")
        self._update_bytes = update_bytes(list(self._shapes))
        self.fold_observer: Callable[[float], None] | None = None
        """Called with each accepted report's validate-and-fold seconds (``/metrics``)."""

    # -- reports ---------------------------------------------------------------------------------
    def accept(self, env: ReportEnvelope) -> None:
        """Validate and fold in one report, or raise :class:`ReportRejected`."""
        if self.stopped:
            raise ConnectionError("aggregator is down")
        state = self._serving(env.round_key)
        if not verify_ticket(self._secret, self.name, env.round_key, env.device_id, env.ticket):
            raise ReportRejected(403, "invalid report ticket")
        if self._secagg.enabled:
            raise ReportRejected(
                409, "this job uses secure aggregation: updates are accepted only masked"
            )
        most = self._robust.max_examples_per_report
        if not 0 < env.num_examples <= most:
            raise ReportRejected(422, f"num_examples must be in 1..{most}")
        if len(env.update) > self._max_bytes:
            raise ReportRejected(413, f"update exceeds {self._max_bytes} bytes")
        started = time.perf_counter()
        try:
            # Zero-copy, aligned, read-only views: the update is read twice (finiteness, then
            # the weighted fold) and never kept, so copying it would be a third pass for nothing.
            update = decode_arrays(
                env.update, max_bytes=self._max_bytes, expected_shapes=self._shapes, copy=False
            )
            validate_update(update, self._shapes)
        except (SerdeError, UpdateRejected) as exc:
            raise ReportRejected(422, f"update refused: {exc}") from None
        try:
            device_metrics = validate_metrics(env.metrics)
        except MetricsRejected as exc:
            raise ReportRejected(422, f"metrics refused: {exc}") from None
        key = env.round_key
        with self._lock:
            if key in self._published:
                raise ReportRejected(409, f"round {key} closed while the report arrived")
            self._inflight[key] += 1  # the partial waits for this report (see tick)
        try:
            self._fold(state, env, update, device_metrics, started)
        finally:
            with self._lock:
                self._inflight[key] -= 1
                if self._inflight[key] <= 0:
                    del self._inflight[key]
                held = key in self._rounds and self._rounds[key].phase is Phase.closing
            if held and self.wake is not None:
                self.wake()  # its round closed meanwhile: publish the partial now

    def _fold(
        self,
        state: RoundState,
        env: ReportEnvelope,
        update: Weights,
        device_metrics: dict[str, float],
        started: float,
    ) -> None:
        """Take one of the round's K slots for a valid report, then fold it in (cannot fail)."""
        key = env.round_key
        claimed = time.perf_counter()
        self._claim(state, env.device_id)
        claim_seconds = time.perf_counter() - claimed
        with self._lock:
            if self._private:
                acc = self._sums.get(key)
                if acc is None:
                    acc = self._sums[key] = StreamingSum(self._shapes)
                if self._clip is not None:
                    update, _ = clip_update(update, self._clip)
                acc.add(update, capped_weight(env.num_examples, self._weight_cap), validated=True)
            else:
                fold = self._folds.get(key)
                if fold is None:
                    fold = self._folds[key] = make_fold(self._shapes, self._robust, self._history)
                fold.add(update, float(env.num_examples))
            self._metrics.setdefault(key, MetricSums()).add(device_metrics, env.num_examples)
            # The store's claim (a round trip) is not folding: leave it out of the fold time.
            folded = time.perf_counter() - started - claim_seconds
            self._load.add(self._now, len(env.update), folded)
        if self.fold_observer is not None:
            self.fold_observer(folded)

    def _serving(self, round_key: str) -> RoundState:
        """The round a device message is for, refused unless it is reporting here."""
        state = self._rounds.get(round_key)
        if state is None or state.phase in (Phase.selecting, Phase.waiting):
            # A device can train and report before this aggregator's next tick has seen its
            # round configured: look again in the store before refusing (miss path only).
            state = self._refresh_round(round_key)
        if state is None:
            raise ReportRejected(404, f"unknown round {round_key!r}")
        if state.phase is not Phase.reporting or round_key in self._published:
            raise ReportRejected(409, f"round {round_key} is closed ({state.phase.value})")
        if self.actor_id not in state.aggregators:
            raise ReportRejected(421, "this aggregator does not serve that round")
        return state

    def _claim(self, state: RoundState, device_id: str) -> None:
        """Take one of the round's K report slots for ``device_id``, once per device across all
        of the round's aggregators (the store's claim); raise :class:`ReportRejected` (409) for
        a second report, a report after the device's abort, or when the round is full."""
        key = state.key
        with self._lock:
            if device_id in self._seen[key]:
                raise ReportRejected(409, "this device already reported for this round")
            self._seen[key].add(device_id)  # reserved: a concurrent duplicate is refused
        try:
            claim = self.store.claim_report(self.name, key, self.actor_id, state.goal, device_id)
        except BaseException:
            with self._lock:
                self._seen[key].discard(device_id)
            raise
        if claim is Claim.taken:
            return
        if claim is not Claim.reported:  # the store holds the reason; let it answer again
            with self._lock:
                self._seen[key].discard(device_id)
        if claim is Claim.full:
            raise ReportRejected(409, f"round {key} already has its reports")
        if claim is Claim.aborted:
            raise ReportRejected(409, "this device aborted its task for this round")
        raise ReportRejected(409, "this device already reported for this round")

    # -- secure aggregation ------------------------------------------------------------------
    def secagg(
        self, round_key: str, device_id: str, ticket: str, step: str, body: bytes
    ) -> dict[str, Any] | None:
        """One device call of a Secure Aggregation session.

        Sends (``advertise``, ``shares``, ``masked``, ``unmask``) return ``{}`` once taken;
        polls (``roster``, ``inbox``, ``survivors``) return the published message, or ``None``
        while it is not published yet. Refusals raise :class:`ReportRejected`: 410 when the
        device is no longer part of the session (it missed a phase, or the group failed).
        """
        if self.stopped:
            raise ConnectionError("aggregator is down")
        if not self._secagg.enabled:
            raise ReportRejected(404, "secure aggregation is off for this job")
        if step not in SECAGG_STEPS:
            raise ReportRejected(404, f"unknown secure aggregation step {step!r}")
        if not verify_ticket(self._secret, self.name, round_key, device_id, ticket):
            raise ReportRejected(403, "invalid report ticket")
        limit = self._secagg_limit
        if len(body) > limit:
            raise ReportRejected(413, f"message exceeds {limit} bytes")
        if step == "advertise":
            self._advertise(round_key, device_id, body)
            return {}
        session = self._sessions.get(round_key)
        if session is None:
            raise ReportRejected(410, f"no secure aggregation session for {round_key} here")
        with session.lock:
            srv = session.server
            if srv.phase is ServerPhase.failed:
                raise ReportRejected(410, f"the group failed: {session.error}")
            try:
                if step == "roster":
                    roster = srv.roster()
                    if roster is None:
                        return None
                    if device_id not in {entry[0] for entry in roster.devices}:
                        raise ReportRejected(410, "this device is not in the group's roster")
                    return roster.to_dict()
                if step == "inbox":
                    if srv.phase in (ServerPhase.advertise, ServerPhase.share):
                        return None
                    if srv.phase is not ServerPhase.collect:
                        raise ReportRejected(410, "the masked input phase is over")
                    return srv.inbox(device_id).to_dict()
                if step == "survivors":
                    survivors = srv.survivors()
                    return None if survivors is None else survivors.to_dict()
                if step == "masked":
                    srv.receive_masked(MaskedInput(device_id, body))
                else:
                    doc = _json_object(body)
                    if step == "shares":
                        shares = ShareKeys.from_dict(doc)
                        _same_device(shares.sender, device_id)
                        srv.receive_shares(shares)
                    else:
                        unmask = UnmaskShares.from_dict(doc)
                        _same_device(unmask.device_id, device_id)
                        srv.receive_unmask(unmask)
            except KeyError:
                raise ReportRejected(410, "this device is not part of that phase") from None
            except SecAggRejected as exc:
                status = 409 if exc.reason in (REASON_PHASE, REASON_DUPLICATE) else 422
                if exc.reason == REASON_UNKNOWN:  # not a member of this phase: it missed one
                    status = 410
                raise ReportRejected(status, f"secure aggregation: {exc}") from None
            self._drive(session, self._now)
        return {}

    def _advertise(self, round_key: str, device_id: str, body: bytes) -> None:
        state = self._serving(round_key)
        try:
            advert = KeyAdvert.from_dict(_json_object(body))
        except SecAggRejected as exc:
            raise ReportRejected(422, f"secure aggregation: {exc}") from None
        _same_device(advert.device_id, device_id)
        key = round_key
        self._claim(state, device_id)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                group = secagg_group_id(self.name, key, self.actor_id)
                plan = PrivacyPlan.for_group(self.spec.aggregation, group)
                assert plan is not None
                session = self._sessions[key] = _Session(
                    SecAggServer(secagg_params(plan, self._shapes)), group, plan
                )
        # The slot is taken before the keys are checked: a device whose advertisement is then
        # refused (a replayed key) loses its own slot, like a device that dropped out.
        with session.lock:
            try:
                session.server.receive_advert(advert)
            except SecAggRejected as exc:
                status = 409 if exc.reason == REASON_PHASE else 422
                raise ReportRejected(status, f"secure aggregation: {exc}") from None

    def _drive(self, session: _Session, now: float) -> None:
        """Close every phase that is due (all members answered, or its deadline passed) and
        record the outcome once the session ends. Caller holds ``session.lock``."""
        srv = session.server
        timeout = self._secagg.phase_timeout_seconds
        try:
            while True:
                phase = srv.phase
                if phase in (ServerPhase.done, ServerPhase.failed, ServerPhase.advertise):
                    return
                if srv.pending() > 0 and now < session.deadline:
                    return
                if phase is ServerPhase.share:
                    srv.close_share()
                elif phase is ServerPhase.collect:
                    srv.close_collect()
                else:
                    result = srv.finish()
                    count = len(result.survivors)
                    session.metrics = metrics_from_secagg(
                        result.total, self._shapes, session.plan
                    ).to_bytes()
                    session.partial = sum_from_secagg(
                        result.total, self._shapes, count, session.plan
                    ).to_bytes()
                    return
                session.deadline = now + timeout
        except SecAggFailed as exc:
            self._fail(session, str(exc))

    def _fail(self, session: _Session, reason: str) -> None:
        log.warning("secure aggregation group %s failed: %s", session.group, reason)
        session.error = reason
        session.partial = SECAGG_FAILED + reason.encode()[:1000]

    def _secagg_partial(self, key: str, now: float) -> bytes | None:
        """The partial sum of a closed round's session, once it has one (None: not yet)."""
        session = self._sessions.get(key)
        if session is None:
            return StreamingSum(self._shapes).to_bytes()  # nobody advertised to this group
        with session.lock:
            if session.server.phase is ServerPhase.advertise:
                try:
                    session.server.close_advertise()
                    session.deadline = now + self._secagg.phase_timeout_seconds
                except SecAggFailed as exc:
                    self._fail(session, str(exc))
            if session.partial is None:
                self._drive(session, now)
            return session.partial

    def _refresh_round(self, round_key: str) -> RoundState | None:
        fresh = {r.key: r for r in self.store.rounds(self.name)}
        with self._lock:
            self._rounds = fresh
        return fresh.get(round_key)

    def partial(self, round_key: str) -> StreamingSum | BoundedFold | RobustFold | None:
        """What this aggregator holds of a round (``.count``: reports taken), or None."""
        return self._folds.get(round_key) or self._sums.get(round_key)

    def _partial_bytes(self, key: str) -> bytes:
        """This aggregator's partial sum of a closed round (called under the lock)."""
        fold = self._folds.get(key)
        if fold is not None:
            return fold.finish().to_bytes()
        return (self._sums.get(key) or StreamingSum(self._shapes)).to_bytes()

    # -- timer -------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if self.stopped:
            return
        self._registration.beat(now)
        self._now = now
        self._publish_load(now)
        rounds = {r.key: r for r in self.store.rounds(self.name)}
        to_publish: list[tuple[str, bytes]] = []
        secure: list[str] = []
        with self._lock:
            self._rounds = rounds
            for key, state in rounds.items():
                if state.phase is Phase.closing and self.actor_id in state.aggregators:
                    if key in self._published or self._inflight.get(key):
                        continue  # published, or a report in flight will wake the next tick
                    if self._secagg.enabled:
                        secure.append(key)
                        continue
                    data = self._partial_bytes(key)
                    metrics = self._metrics.get(key)
                    if metrics is not None:  # before the sum: the master reads both together
                        to_publish.append((key + METRICS_PARTIAL, metrics.to_bytes()))
                    to_publish.append((key, data))
                    self._published.add(key)
            for key in {*self._sums, *self._folds, *self._sessions, *self._seen}:
                st = rounds.get(key)
                if st is None or not st.active:
                    self._forget(key)
        # Sessions advance under their own locks (unmasking a large group takes a while), not
        # under the aggregator's: reports of the next round keep flowing meanwhile.
        for key in secure:
            partial = self._secagg_partial(key, now)
            if partial is None:
                continue  # the session is still in its later phases
            with self._lock:
                self._published.add(key)
            session = self._sessions.get(key)
            if session is not None and session.metrics is not None:
                to_publish.append((key + METRICS_PARTIAL, session.metrics))
            to_publish.append((key, partial))
        for key, data in to_publish:
            key, metrics_part, _ = key.partition(METRICS_PARTIAL)
            self.store.put_partial(self.name, key, self.actor_id + metrics_part, data)
        for key, state in rounds.items():
            if (
                state.phase is Phase.closing
                and state.master == self.actor_id
                and key not in self._committed
            ):
                self._try_commit(state, now)

    def _publish_load(self, now: float) -> None:
        """Publish this aggregator's measured load for the pool's sizing (every heartbeat)."""
        if now - self._load_published < self._load_every:
            return
        with self._lock:
            load = self._load.rates(now)
        load.update(update_bytes=self._update_bytes, at=now)
        self.store.put_actor_load(self.name, self.actor_id, load)
        self._load_published = now

    def _forget(self, key: str) -> None:
        self._sums.pop(key, None)
        self._metrics.pop(key, None)
        self._folds.pop(key, None)
        self._sessions.pop(key, None)
        self._seen.pop(key, None)
        self._published.discard(key)
        self._committed.discard(key)

    # -- master aggregator ---------------------------------------------------------------------
    def _try_commit(self, state: RoundState, now: float) -> None:
        partials = self.store.partials(self.name, state.key)
        device_metrics = MetricSums()
        for name in [k for k in partials if k.endswith(METRICS_PARTIAL)]:
            device_metrics.merge(MetricSums.from_bytes(partials.pop(name)))
        live = self.store.members(self.name, Role.aggregator)
        expected = [a for a in state.aggregators if a in live]
        grace_over = now >= state.closing_deadline - self._commit_grace(state)
        if any(a not in partials for a in expected) and not grace_over:
            return
        partials.pop(COMMIT_ERROR_FIELD, None)
        failed = [
            f"{agg}: {data[len(SECAGG_FAILED) :].decode(errors='replace')}"
            for agg, data in partials.items()
            if data.startswith(SECAGG_FAILED)
        ]
        if failed:
            self._committed.add(state.key)
            self._commit_failed(state, "secure aggregation group failed: " + "; ".join(failed))
            return
        total = StreamingSum(self._shapes)
        for data in partials.values():
            total.merge(StreamingSum.from_bytes(data, self._shapes))
        self._committed.add(state.key)
        if total.count < state.minimum:
            self._commit_failed(
                state, f"{total.count} reports reached the master, need {state.minimum}"
            )
            return
        try:
            self._commit(state, total, device_metrics.means())
        except (FencedError, ConflictError) as exc:
            self._commit_failed(state, str(exc))
        except CommitRefused as exc:
            self._commit_failed(state, f"pre-commit check refused the model: {exc}", publish=True)
        except StoreUnavailable:
            self._committed.discard(state.key)  # try again once the store is back
            raise
        except Exception as exc:
            # Evaluation or the optimizer failed on this model: the coordinator must hear of it
            # (and fail the job after rounds.maxCommitFailures), not wait for a deadline.
            log.exception("round %d (%s): commit failed", state.round, state.key)
            self._commit_failed(state, f"{type(exc).__name__}: {exc}", publish=True)

    def _commit_failed(self, state: RoundState, reason: str, *, publish: bool = False) -> None:
        """Nothing is committed for the attempt; ``publish`` tells the coordinator why, so it
        abandons the attempt at once and counts it towards ``rounds.maxCommitFailures``."""
        self.last_commit_error = reason
        log.warning("round %d (%s): nothing committed: %s", state.round, state.key, reason)
        if publish:
            self.store.put_partial(self.name, state.key, COMMIT_ERROR_FIELD, reason.encode()[:2000])
            self.store.add_count(self.name, state.key, COMMIT_REFUSED_COUNT, self.actor_id, 1)

    def _commit_grace(self, state: RoundState) -> float:
        """Wait at most half the commit window for partial sums of aggregators that vanished.

        Secure aggregation groups publish only after their last phase, so the master waits
        for them until just before the coordinator's commit deadline."""
        if self._secagg.enabled:
            return max(1.0, 0.1 * self._secagg.phase_timeout_seconds)
        return (
            (state.closing_deadline - state.reporting_deadline) / 2
            if state.reporting_deadline
            else 0.0
        )

    def _commit(
        self, state: RoundState, total: StreamingSum, device_metrics: dict[str, float] | None = None
    ) -> None:
        weights, opt_state = self._checkpoints.load(state.model_version)
        optimizer = make_server_optimizer(self.spec.aggregation, self._shapes)
        if opt_state:
            optimizer.load_state(opt_state)
        metrics: dict[str, Any] = {"reports": total.count}
        if self._private:
            metrics["weight"] = total.total_weight  # capped weights, not example counts
        else:
            metrics["examples"] = total.total_weight
        denominator: float | None = None
        if self._accountant is not None and self._noise is not None:
            total.add_noise(
                noise_stddev(self._dp.noise_multiplier, self._dp.clip_norm), self._noise
            )
            # McMahan's fixed-denominator estimator: the noisy sum over the expected weight of
            # a round (goal count; exact when weights are 1), never the realised weight sum.
            denominator = float(self.spec.rounds.goal_count)
            metrics["epsilon"] = self._accountant.epsilon(state.round)
            metrics["delta"] = self._dp.delta
        new = optimizer.step(weights, total.mean(denominator))
        metrics["model_norm"] = check_commit(
            weights, new, max_norm_ratio=self._robust.max_model_norm_ratio or None
        )
        metrics.update(device_metrics or {})
        if self._evaluator is not None:
            scores = self._evaluator(new)
            bad = sorted(k for k, v in scores.items() if not math.isfinite(float(v)))
            if bad:
                raise CommitRefused(f"the new model evaluates to a non-finite {', '.join(bad)}")
            metrics.update(scores)
        if self._models is None:
            self._models = storage_for(self.spec.checkpoints, self.store)
        commit_model(
            self.store,
            self._models,
            self.spec.checkpoints,
            self.name,
            state.token,
            state.model_version,
            state.round,
            pack_checkpoint(new, optimizer.state()),
            metrics,
        )

    def stop(self) -> None:
        """Crash semantics: partial sums and secure aggregation sessions are lost."""
        self.stopped = True
        with self._lock:
            self._sums.clear()
            self._metrics.clear()
            self._folds.clear()
            self._sessions.clear()


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ReportRejected(422, "secure aggregation message is not JSON") from None
    if not isinstance(doc, dict):
        raise ReportRejected(422, "secure aggregation message must be a JSON object")
    return doc


def _same_device(claimed: str, device_id: str) -> None:
    if claimed != device_id:
        raise ReportRejected(403, "the message names another device than its sender")
