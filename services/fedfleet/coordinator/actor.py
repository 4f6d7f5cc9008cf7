"""The Coordinator actor: round loop, quotas, pipelining, failover.

Bonawitz et al. §4.2: one Coordinator per FL job holds a lease in the shared locking service;
a standby (or the restarted pod) takes the lease when it expires. All state it needs lives in
the store — round attempts, counters, the committed checkpoint — so a new leader resumes from
the last committed checkpoint. Attempts that were in flight under the old leader are abandoned
(nothing of them was committed) and the round is re-run.

The actor is a state machine driven by :meth:`Coordinator.tick`; the embedded runner calls it
with simulated time, the service calls it from a timer with wall-clock time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from fedfleet.coordinator.tick_reads import TickReads
from fedfleet.core.autoscale import round_aggregator_limit
from fedfleet.core.commitcheck import COMMIT_ERROR_FIELD, COMMIT_REFUSED_COUNT
from fedfleet.core.dp import PrivacyAccountant
from fedfleet.core.protocol import SECAGG_FAILED, TERMINAL, Phase, Quota, RoundState
from fedfleet.core.roles import DEADLINE_EXCEEDED, JobPhase, Role
from fedfleet.core.selection import Outcome, reporting_outcome, selection_outcome, split_quota
from fedfleet.core.spec import FLJob
from fedfleet.store.base import FencedError, Store

__all__ = ["COMMIT_FAILURES", "AttemptEnd", "Coordinator", "CoordinatorSettings"]

COMMIT_FAILURES = "commit-failures"
"""The reason of a job that failed because ``rounds.maxCommitFailures`` consecutive attempts
could not be committed; the job record's ``last_error`` says what the last one hit."""
_COMMIT_REFUSED = "commit-refused"
_NO_COMMIT = "no-commit"


@dataclass(frozen=True, slots=True)
class CoordinatorSettings:
    lease_ttl: float = 10.0
    """Seconds a lease lives without renewal; a standby takes over after it expires."""
    commit_timeout: float = 30.0
    """Seconds a closing attempt may wait for the master aggregator's commit."""
    linger: float = 5.0
    """Seconds a finished attempt stays visible so selectors and aggregators can clean up."""
    checkin_headroom: float = 2.0
    """Check-ins steered towards, as a multiple of the rate the round strictly needs."""
    active_since: float | None = None
    """When the job's current active period began, on the clock ``tick`` is given: where
    ``spec.activeDeadlineSeconds`` counts from. None: when the job first started (the store's
    ``start_time``). The operator passes the time of the job's creation or last resume
    (``FEDFLEET_ACTIVE_SINCE``), so the deadline's clock resets on resume."""


@dataclass(frozen=True, slots=True)
class AttemptEnd:
    """A finished attempt, as reported to observers (the runner's progress display)."""

    round: int
    attempt: int
    selected: int
    reported: int
    dropped: int
    abandoned: bool
    reason: str
    opened_at: float
    ended_at: float
    model_version: int
    metrics: dict[str, Any] = field(default_factory=dict)


class Coordinator:
    def __init__(
        self,
        job: FLJob,
        store: Store,
        *,
        actor_id: str,
        settings: CoordinatorSettings | None = None,
        on_attempt_end: Callable[[AttemptEnd], None] | None = None,
    ) -> None:
        self.job = job
        self.name = job.key
        self.spec = job.spec
        self.store = store
        self.actor_id = actor_id
        self.settings = settings or CoordinatorSettings()
        self.on_attempt_end = on_attempt_end
        self.token: int | None = None
        self._next_attempt = 1
        self._ended: set[int] = set()
        self._unrecorded: dict[int, tuple[RoundState, float, bool, str]] = {}
        """Attempts ended in the store whose record is not written yet (retried each tick)."""
        self._ends: dict[int, AttemptEnd] = {}
        """The records of those attempts, once made (so a retry does not count them twice)."""
        self._last_quotas: dict[str, tuple[int, int, int]] = {}
        self._round_seconds = min(
            self.spec.rounds.selection_timeout_seconds, self.spec.rounds.reporting_timeout_seconds
        )
        self._measured: float | None = None
        """The same smoothing over measured intervals only (None until the first): pace
        steering's bound for short rounds, which the guess above would hide for many rounds."""
        self._last_commit_at: float | None = None
        self._first_opened: float | None = None
        """When this leader opened its first selection: the first commit's interval counts
        from there, and until then the time since is pace steering's guess of a round."""
        self._commit_failures = 0
        """Consecutive attempts that reached closing but committed nothing."""
        self._last_error = ""
        self._failed = False
        self._started_at: float | None = None
        self.tick_again = False
        """Set when a tick left work for the next one (a round whose selection just completed
        waits to be configured): the service ticks again at once instead of on its timer."""
        self.job_state: dict[str, Any] | None = None
        """The job state as this leader last read or wrote it (None until then): what the
        service's per-job gauges show, without a store read of their own."""
        sa = self.spec.aggregation.secure_aggregation
        # Secure aggregation runs three more phases after a round closes, each up to its
        # timeout, before the groups' sums reach the master.
        self._closing_seconds = self.settings.commit_timeout + (
            3 * sa.phase_timeout_seconds if sa.enabled else 0.0
        )
        self._total_rounds = self.spec.rounds.total
        """Rounds the job runs: the spec's total, or fewer when the epsilon budget says so."""
        dp = self.spec.aggregation.differential_privacy
        if dp.enabled and dp.epsilon_budget is not None:
            accountant = PrivacyAccountant(
                noise_multiplier=dp.noise_multiplier,
                sampling_probability=self.spec.dp_sampling_probability,
                delta=dp.delta,
                method=dp.accountant,
            )
            self._total_rounds = accountant.max_rounds(dp.epsilon_budget, self.spec.rounds.total)

    @property
    def is_leader(self) -> bool:
        return self.token is not None

    # -- lease ----------------------------------------------------------------------------------
    def _hold_lease(self, now: float) -> bool:
        ttl = self.settings.lease_ttl
        if self.token is not None:
            if self.store.renew_lease(self.name, self.actor_id, self.token, ttl):
                return True
            self.token = None
        token = self.store.acquire_lease(self.name, self.actor_id, ttl)
        if token is None:
            return False
        self.token = token
        self._resume(now)
        return True

    def _resume(self, now: float) -> None:
        """Adopt the job after taking the lease: abandon whatever the old leader had in flight."""
        assert self.token is not None
        rounds = self.store.rounds(self.name)
        prev = self.store.job_state(self.name)
        # Attempt numbers name attempts and their tickets, so they must never repeat. The
        # store's record gives the next one; the fencing token (which grows even when the
        # store lost its data: see the Redis store) is a floor for when it has no record.
        self._next_attempt = max(
            self._next_attempt,
            max((r.attempt for r in rounds), default=0) + 1,
            int(prev.get("next_attempt", 1)),
            self.token,
        )
        self._started_at = float(prev.get("start_time", now))
        self._commit_failures = int(prev.get("commit_failures", 0))
        self._last_error = str(prev.get("last_error", ""))
        version = self.store.model_version(self.name)
        for state in rounds:
            if state.active:
                # A closing attempt whose commit landed before the failover did commit.
                landed = state.phase is Phase.closing and version > state.model_version
                self._end(
                    state,
                    now,
                    abandoned=not landed,
                    reason="" if landed else "coordinator-failover",
                )
        self._publish_job(now, JobPhase(prev.get("phase", JobPhase.running.value)))

    def step_down(self) -> None:
        """Release the lease (graceful shutdown) so a standby takes over at once."""
        if self.token is not None:
            self.store.release_lease(self.name, self.actor_id, self.token)
            self.token = None

    # -- main loop ------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if not self._hold_lease(now):
            return
        try:
            self._tick(now)
        except FencedError:
            self.token = None  # someone newer holds the job; become a standby again

    def _tick(self, now: float) -> None:
        # One tick reads the same keys many times (the rounds, their counters, the model
        # version: ~120 store calls a round when read afresh each time); within a tick each
        # read is made once, until the tick's own next write.
        store = self.store
        self.store = cast(Store, TickReads(store))
        try:
            self._tick_once(now)
        finally:
            self.store = store

    def _tick_once(self, now: float) -> None:
        for r, ended_at, abandoned, reason in list(self._unrecorded.values()):
            self._end(r, ended_at, abandoned=abandoned, reason=reason, stored=True)
        state = self.store.job_state(self.name)
        self.job_state = state
        phase = JobPhase(state.get("phase", JobPhase.running.value))
        if phase in (JobPhase.succeeded, JobPhase.failed):
            return
        rounds = self.store.rounds(self.name)
        if self._past_deadline(now):
            self._finish(now, rounds, failed_reason=DEADLINE_EXCEEDED)
            return
        for r in rounds:
            if r.phase in TERMINAL:
                if now - max(r.closing_deadline, r.opened_at) >= self.settings.linger:
                    self.store.clear_round(self.name, r.key)
                continue
            self._advance(r, now)
            if self._failed:
                return
        rounds = self.store.rounds(self.name)
        if self._done():
            self._finish(now, rounds)
            return
        self._ensure_selection(rounds, now)
        self._push_quotas(self.store.rounds(self.name), now)

    def _advance(self, r: RoundState, now: float) -> None:
        if r.phase is Phase.selecting:
            selected = sum(self.store.counts(self.name, r.key, "selected").values())
            outcome = selection_outcome(r, selected, now)
            if outcome is Outcome.proceed:
                self._put(r.evolve(phase=Phase.waiting))
                self.tick_again = True  # configure it as soon as the pipeline allows
            elif outcome is Outcome.abandon:
                self._end(r, now, abandoned=True, reason="too-few-selected")
        elif r.phase is Phase.waiting:
            if not any(
                x.phase in (Phase.reporting, Phase.closing) for x in self.store.rounds(self.name)
            ):
                self._configure(r, now)
        elif r.phase is Phase.reporting:
            selected = sum(self.store.counts(self.name, r.key, "selected").values())
            reported = sum(self.store.counts(self.name, r.key, "reported").values())
            dropped = sum(self.store.counts(self.name, r.key, "dropped").values())
            outstanding = max(0, selected - reported - dropped)
            outcome = reporting_outcome(r, reported, now, outstanding=outstanding)
            if outcome is Outcome.close:
                self._put(
                    r.evolve(phase=Phase.closing, closing_deadline=now + self._closing_seconds)
                )
            elif outcome is Outcome.abandon:
                self._end(r, now, abandoned=True, reason="too-few-reports")
        elif r.phase is Phase.closing:
            if self.store.model_version(self.name) > r.model_version:
                # The devices of the round already selected wait on its configuration: give
                # it before this one's bookkeeping (its record, the job state, the observers).
                self._put(r.evolve(phase=Phase.committed, reason="", closing_deadline=now))
                self._configure_next(now)
                self._end(r, now, abandoned=False, reason="", stored=True)
            elif self._group_failed(r):
                self._end(r, now, abandoned=True, reason="secagg-group-failed")
            elif (error := self._commit_error(r)) is not None:
                self._end(r, now, abandoned=True, reason=f"{_COMMIT_REFUSED}: {error}")
            elif now >= r.closing_deadline:
                self._end(r, now, abandoned=True, reason=_NO_COMMIT)

    def _configure_next(self, now: float) -> None:
        """Configure the selected round waiting for the pipeline, if nothing is in flight."""
        rounds = self.store.rounds(self.name)
        if any(x.phase in (Phase.reporting, Phase.closing) for x in rounds):
            return
        waiting = next((x for x in rounds if x.phase is Phase.waiting), None)
        if waiting is not None:
            self._configure(waiting, now)

    def _commit_error(self, r: RoundState) -> str | None:
        """Why the round's master could not commit, once it published that."""
        if not self.store.counts(self.name, r.key, COMMIT_REFUSED_COUNT):
            return None
        data = self.store.partials(self.name, r.key).get(COMMIT_ERROR_FIELD)
        return "no reason given" if data is None else data.decode(errors="replace")

    def _group_failed(self, r: RoundState) -> bool:
        """A Secure Aggregation group of the round failed: nothing can be committed for it."""
        if not self.spec.aggregation.secure_aggregation.enabled:
            return False
        partials = self.store.partials(self.name, r.key)
        return any(data.startswith(SECAGG_FAILED) for data in partials.values())

    def _configure(self, r: RoundState, now: float) -> None:
        version = self.store.model_version(self.name)
        self._put(
            r.evolve(
                phase=Phase.reporting,
                round=version + 1,
                model_version=version,
                reporting_deadline=now + self.spec.rounds.reporting_timeout_seconds,
            )
        )

    def _ensure_selection(self, rounds: list[RoundState], now: float) -> None:
        active = [r for r in rounds if r.active]
        if any(r.phase in (Phase.selecting, Phase.waiting) for r in active):
            return
        in_flight = sum(1 for r in active if r.phase in (Phase.reporting, Phase.closing))
        if self.store.model_version(self.name) + in_flight >= self._total_rounds:
            return
        # Aggregators being drained (the operator shrinks the pool) get no new round; the
        # rounds they hold run to their end.
        draining = self.store.draining(self.name)
        members = self.store.members(self.name, Role.aggregator)
        live = sorted(a for a in members if a not in draining)
        if not live:
            return
        policy = self.spec.rounds
        attempt = self._next_attempt
        # A round spreads over the pool (the operator sizes it to the devices and update bytes
        # of a round), up to what a round can use (Secure Aggregation groups must keep their
        # minimum size), rotating through the live ones from attempt to attempt.
        wanted = min(len(live), round_aggregator_limit(self.spec))
        start = attempt % len(live)
        aggregators = tuple((live + live)[start : start + wanted])
        self._next_attempt += 1
        version = self.store.model_version(self.name)
        self._put(
            RoundState(
                round=version + 1 + in_flight,
                attempt=attempt,
                phase=Phase.selecting,
                target=policy.selection_target,
                goal=policy.goal_count,
                minimum=policy.minimum_count,
                selection_deadline=now + policy.selection_timeout_seconds,
                model_version=version,
                aggregators=aggregators,
                master=aggregators[attempt % len(aggregators)],
                token=self._token(),
                opened_at=now,
            )
        )
        if self._first_opened is None:
            self._first_opened = now
        self._publish_job(now, JobPhase.running)

    def _push_quotas(self, rounds: list[RoundState], now: float) -> None:
        selectors = list(self.store.members(self.name, Role.selector))
        if not selectors:
            return
        selecting = next((r for r in rounds if r.phase is Phase.selecting), None)
        target = self.spec.rounds.selection_target
        rate = self.settings.checkin_headroom * target / max(1.0, self._round_seconds)
        per_rate = rate / len(selectors)
        counted: dict[str, int] = {}
        aggs: tuple[str, ...]
        # The selection after the one open now (or the next one, when none is) opens when the
        # round in flight commits and the selected round is configured: expected one measured
        # round after the last commit (0: not known yet).
        in_flight = any(r.phase in (Phase.reporting, Phase.closing) for r in rounds)
        next_opening = (
            max(now, self._last_commit_at + self._measured)
            if in_flight and self._measured and self._last_commit_at is not None
            else 0.0
        )
        pace = self._pace_seconds
        if not pace and self._first_opened is not None:
            # No round measured yet: the first one has taken at least this long so far.
            pace = max(0.05, now - self._first_opened)
        if selecting is None:
            shares = dict.fromkeys(selectors, 0)
            attempt, aggs = 0, ()
            # The next selection opens when the round in flight commits: within a round.
            next_open = now + min(1.0, 0.5 * self._pace_seconds or 1.0)
        else:
            counted = self.store.counts(self.name, selecting.key, "selected")
            shares = split_quota(selecting.target - sum(counted.values()), selectors)
            attempt, aggs = selecting.attempt, selecting.aggregators
            next_open = now
        wanted = {s: (attempt, shares[s], counted.get(s, 0)) for s in selectors}
        if wanted == self._last_quotas:
            return
        self._last_quotas = wanted
        share = -(-target // len(selectors))
        self.store.put_quotas(
            self.name,
            self._token(),
            {
                s: Quota(
                    round=selecting.round if selecting else 0,
                    attempt=attempt,
                    count=shares[s],
                    checkin_rate=per_rate,
                    next_open=next_open,
                    aggregators=aggs,
                    round_share=share,
                    counted=counted.get(s, 0),
                    round_seconds=pace,
                    next_opening=next_opening,
                )
                for s in selectors
            },
        )

    @property
    def _pace_seconds(self) -> float:
        """The measured round duration pace steering may rely on (0 until one was measured)."""
        return self._measured or 0.0

    # -- endings --------------------------------------------------------------------------------
    def _end(
        self, r: RoundState, now: float, *, abandoned: bool, reason: str, stored: bool = False
    ) -> None:
        """End attempt ``r`` (``stored``: its final state is already in the store)."""
        phase = Phase.abandoned if abandoned else Phase.committed
        if not stored:
            self._put(r.evolve(phase=phase, reason=reason, closing_deadline=now))
        if r.attempt in self._ended:
            return
        # Until its record is written, the ending is retried at the start of every tick: the
        # attempt's final state is already stored, so a store outage between the two would
        # otherwise lose the record of a committed version for good.
        self._unrecorded.setdefault(r.attempt, (r, now, abandoned, reason))
        end = self._ends.get(r.attempt)
        if end is None:
            end = self._attempt_end(r, now, abandoned=abandoned, reason=reason)
            self._count_commit_failure(r, end)
            self._ends[r.attempt] = end
        self.store.record_attempt(self.name, self._token(), asdict(end))
        self._ended.add(r.attempt)
        del self._unrecorded[r.attempt], self._ends[r.attempt]
        self._publish_job(now, JobPhase.running, last=end)
        if self.on_attempt_end is not None:
            self.on_attempt_end(end)
        if self._commit_failures >= self.spec.rounds.max_commit_failures and not self._failed:
            self._fail(now)

    def _attempt_end(
        self, r: RoundState, now: float, *, abandoned: bool, reason: str
    ) -> AttemptEnd:
        """The attempt's record (its store reads first, then the round-duration bookkeeping)."""
        version = self.store.model_version(self.name)
        history = [] if abandoned else self.store.metrics(self.name)
        counts = [
            sum(self.store.counts(self.name, r.key, kind).values())
            for kind in ("selected", "reported", "dropped")
        ]
        metrics: dict[str, Any] = dict(history[-1]) if history else {}
        if not abandoned:
            since = self._last_commit_at if self._last_commit_at is not None else self._first_opened
            if since is not None:
                # Smoothed round duration steers the check-in rate (pace steering). The first
                # commit's round ran from its selection's opening: not yet pipelined, so an
                # overestimate that the next commits correct.
                interval = now - since
                self._round_seconds = 0.7 * self._round_seconds + 0.3 * interval
                self._measured = (
                    interval if self._measured is None else 0.7 * self._measured + 0.3 * interval
                )
            self._last_commit_at = now
        return AttemptEnd(
            round=r.round,
            attempt=r.attempt,
            selected=counts[0],
            reported=counts[1],
            dropped=counts[2],
            abandoned=abandoned,
            reason=reason,
            opened_at=r.opened_at,
            ended_at=now,
            model_version=version,
            metrics=metrics,
        )

    def _count_commit_failure(self, r: RoundState, end: AttemptEnd) -> None:
        """A commit resets the count; an attempt that closed with its reports but committed
        nothing adds one. Other abandonments (too few devices, failover) leave it as it is."""
        if not end.abandoned:
            self._commit_failures, self._last_error = 0, ""
        elif end.reason.startswith(_COMMIT_REFUSED):
            self._commit_failures += 1
            self._last_error = end.reason[len(_COMMIT_REFUSED) + 2 :]
        elif end.reason == _NO_COMMIT:
            self._commit_failures += 1
            self._last_error = f"master aggregator {r.master} committed nothing before the deadline"

    def _fail(self, now: float) -> None:
        """End the job Failed: it cannot commit, and retrying forever would hide that."""
        self._failed = True
        for r in self.store.rounds(self.name):
            if r.active:
                self._end(r, now, abandoned=True, reason="job-failed")
        self._publish_job(now, JobPhase.failed, reason=COMMIT_FAILURES, completed=now)

    def _past_deadline(self, now: float) -> bool:
        deadline = self.spec.active_deadline_seconds
        if deadline is None:
            return False
        since = self.settings.active_since
        if since is None:
            since = self._started_at if self._started_at is not None else now
        return now - since >= deadline

    def _done(self) -> bool:
        version = self.store.model_version(self.name)
        if version >= self._total_rounds:
            return True
        target = self.spec.rounds.target_accuracy
        if target is not None and version > 0:
            history = self.store.metrics(self.name)
            acc = history[-1].get("accuracy") if history else None
            return acc is not None and float(acc) >= target
        return False

    def _finish(self, now: float, rounds: list[RoundState], *, failed_reason: str = "") -> None:
        version = self.store.model_version(self.name)
        for r in rounds:
            if not r.active:
                continue
            if r.phase is Phase.closing and version > r.model_version:
                # Its commit landed after this tick advanced the rounds: it is the job's last
                # committed round, not an abandoned one.
                self._end(r, now, abandoned=False, reason="")
            else:
                self._end(r, now, abandoned=True, reason="job-finished")
        if failed_reason:
            self._publish_job(now, JobPhase.failed, reason=failed_reason, completed=now)
            return
        if version >= self.spec.rounds.total:
            reason = "rounds"
        elif version >= self._total_rounds:
            reason = "epsilon-budget"
        else:
            reason = "target"
        self._publish_job(now, JobPhase.succeeded, reason=reason, completed=now)

    # -- store helpers ------------------------------------------------------------------------
    def _token(self) -> int:
        if self.token is None:
            raise FencedError("not the leader")
        return self.token

    def _put(self, r: RoundState) -> None:
        self.store.put_round(self.name, self._token(), r.evolve(token=self._token()))

    def _publish_job(
        self,
        now: float,
        phase: JobPhase,
        *,
        last: AttemptEnd | None = None,
        reason: str = "",
        completed: float | None = None,
    ) -> None:
        prev = self.store.job_state(self.name)
        state: dict[str, Any] = {
            **prev,
            "phase": phase.value,
            "rounds": self.spec.rounds.total,
            "round": self.store.model_version(self.name),
            "model_version": self.store.model_version(self.name),
            "start_time": prev.get("start_time", self._started_at if self._started_at else now),
            "next_attempt": self._next_attempt,
            "coordinator": self.actor_id,
            "commit_failures": self._commit_failures,
            "last_error": self._last_error,
        }
        if last is not None and not last.abandoned:
            state["last_commit_time"] = last.ended_at
            state["last_metrics"] = {
                k: v for k, v in last.metrics.items() if isinstance(v, int | float)
            }
        if reason:
            state["reason"] = reason
        if completed is not None:
            state["completion_time"] = completed
        self.store.put_job_state(self.name, self._token(), state)
        self.job_state = state
