"""Job-level Prometheus series of the actors: progress, attempts, devices, updates, the store.

:mod:`fedfleet.service.ops` gives every service its liveness series; this module adds what an
operator watches during a week-long job. Every name has the ``fedfleet_`` prefix, counters end
in ``_total`` once exposed, units are ``_seconds`` and ``_bytes``.

Labels, all of bounded cardinality (no device id, no attempt number, no free text):

- ``fljob`` (the FLJob's name) and ``population`` on the series about one job's progress.
  The label is not called ``job``: Prometheus sets ``job`` on every scraped target and would
  rename ours to ``exported_job``. ``fljob`` holds the same value as the ``fedfleet_job`` target
  label the chart's ServiceMonitor and PodMonitor add, so a query may use either; outside the
  chart (``fedfleet up``, a hand-written scrape config) ``fljob`` is the one that is there.
- ``outcome`` and ``reason`` on attempts (the reason's kind, never its text: see
  :func:`reason_label`), ``answer`` on check-ins, ``source`` (``server`` or ``federated``) on
  accuracy and loss, ``phase`` on the job phase, ``op`` (a store method name) on store latency.

Series about one process (the store reachable, the lease held, store latency) carry none of
the job labels: the scrape's target labels say whose process it is.

The per-job gauges come from the job state the coordinator reads each tick anyway, and only the
lease holder sets them (a standby clears them), so no store read is added for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedfleet.core.roles import JobPhase
from fedfleet.core.spec import FLJob
from fedfleet.store.base import Store

__all__ = [
    "ATTEMPT_REASONS",
    "JOB_LABELS",
    "CoordinatorMetrics",
    "fold_seconds_histogram",
    "job_labels",
    "reason_label",
    "timed_store",
    "update_size_histogram",
]

JOB_LABELS = ("fljob", "population")

ATTEMPT_REASONS = frozenset(
    {
        "too-few-selected",
        "too-few-reports",
        "secagg-group-failed",
        "commit-refused",
        "no-commit",
        "coordinator-failover",
        "job-finished",
        "job-failed",
    }
)
"""The kinds of reason an attempt is abandoned for (the coordinator's vocabulary)."""

COMMIT_ERROR_REASONS = frozenset({"commit-refused", "no-commit"})
"""Abandonments that are a failed commit: the master refused its new model, or never wrote."""

ROUND_SECONDS_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
UPDATE_BYTES_BUCKETS = (*(float(4**k * 1024) for k in range(11)), float("inf"))
"""1 KiB to 1 GiB by factors of 4."""
STORE_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    float("inf"),
)


def job_labels(job: FLJob) -> dict[str, str]:
    return {"fljob": job.name, "population": job.spec.population}


def reason_label(reason: str) -> str:
    """An attempt's reason as a label value: ``none`` for a commit, the reason's kind (the text
    before a ``:``, e.g. ``commit-refused``), or ``other`` for one not in the vocabulary."""
    if not reason:
        return "none"
    kind = reason.split(":", 1)[0].strip()
    return kind if kind in ATTEMPT_REASONS else "other"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class CoordinatorMetrics:
    """The coordinator's series: per-job gauges from the job state, and one sample per ended
    attempt (attempts by outcome and reason, round durations, devices, drop-outs)."""

    def __init__(self, registry: CollectorRegistry, job: FLJob) -> None:
        self._labels = job_labels(job)
        self._dp = job.spec.aggregation.differential_privacy.enabled
        labels = list(JOB_LABELS)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*labels, *extra], registry=registry)

        self.round = gauge("fedfleet_job_round", "The job's last committed round")
        self.version = gauge("fedfleet_job_model_version", "The job's committed model version")
        self.accuracy = gauge(
            "fedfleet_job_accuracy",
            "Accuracy of the last committed model: server-side on held-out data (source=server) "
            "or federated evaluation on the devices (source=federated)",
            ("source",),
        )
        self.loss = gauge(
            "fedfleet_job_loss", "Loss of the last committed model, as for accuracy", ("source",)
        )
        self.epsilon = gauge(
            "fedfleet_job_epsilon", "Privacy spent so far (epsilon at the job's delta), DP on"
        )
        self.last_commit = gauge(
            "fedfleet_job_last_commit_timestamp_seconds",
            "Unix time of the job's last commit (its start time before the first commit)",
        )
        self.phase = gauge(
            "fedfleet_job_phase", "1 for the job's current phase, 0 for the others", ("phase",)
        )
        self.attempts = Counter(
            "fedfleet_attempts",
            "Ended round attempts by outcome (committed, abandoned) and reason",
            [*labels, "outcome", "reason"],
            registry=registry,
        )
        self.commit_errors = Counter(
            "fedfleet_commit_errors",
            "Attempts whose commit failed: refused by the master (reason=commit-refused) or "
            "not written before the deadline (reason=no-commit)",
            [*labels, "reason"],
            registry=registry,
        )
        for reason in sorted(COMMIT_ERROR_REASONS):  # present (at 0) before the first error
            self.commit_errors.labels(**self._labels, reason=reason)
        self.durations = Histogram(
            "fedfleet_round_duration_seconds",
            "Seconds from an attempt's opening to its end, by outcome",
            [*labels, "outcome"],
            buckets=ROUND_SECONDS_BUCKETS,
            registry=registry,
        )
        for outcome in ("committed", "abandoned"):
            self.durations.labels(**self._labels, outcome=outcome)
        self.selected = gauge("fedfleet_round_selected_devices", "Devices the last attempt chose")
        self.reported = gauge(
            "fedfleet_round_reported_devices", "Devices whose update the last attempt took"
        )
        self.dropped = gauge(
            "fedfleet_round_dropped_devices", "Chosen devices of the last attempt that dropped out"
        )
        self.dropout = gauge(
            "fedfleet_round_dropout_ratio", "Dropped over selected devices of the last attempt"
        )
        self.devices = Counter(
            "fedfleet_round_devices",
            "Devices over all attempts by state (selected, reported, dropped): rate() of "
            "dropped over selected is the drop-out rate over a window",
            [*labels, "state"],
            registry=registry,
        )
        for state in ("selected", "reported", "dropped"):
            self.devices.labels(**self._labels, state=state)

    def attempt_ended(self, end: Any) -> None:
        """Count one ended attempt (a :class:`~fedfleet.coordinator.actor.AttemptEnd`)."""
        lb = self._labels
        outcome = "abandoned" if end.abandoned else "committed"
        reason = reason_label(end.reason) if end.abandoned else "none"
        self.attempts.labels(**lb, outcome=outcome, reason=reason).inc()
        if reason in COMMIT_ERROR_REASONS:
            self.commit_errors.labels(**lb, reason=reason).inc()
        self.durations.labels(**lb, outcome=outcome).observe(max(0.0, end.ended_at - end.opened_at))
        for state, n, g in (
            ("selected", end.selected, self.selected),
            ("reported", end.reported, self.reported),
            ("dropped", end.dropped, self.dropped),
        ):
            g.labels(**lb).set(n)
            self.devices.labels(**lb, state=state).inc(n)
        self.dropout.labels(**lb).set(end.dropped / end.selected if end.selected else 0.0)

    def job_state(self, state: Mapping[str, Any] | None) -> None:
        """Set the per-job gauges from the job state the leader holds (None: a standby, which
        clears them so that only one replica speaks for the job)."""
        lb = self._labels
        per_job = (self.round, self.version, self.epsilon, self.last_commit)
        if state is None:
            for g in (*per_job, self.accuracy, self.loss, self.phase):
                g.clear()
            return
        for g, key in ((self.round, "round"), (self.version, "model_version")):
            if (v := _number(state.get(key))) is not None:
                g.labels(**lb).set(v)
        at = _number(state.get("last_commit_time", state.get("start_time")))
        if at is not None:
            self.last_commit.labels(**lb).set(at)
        phase = str(state.get("phase", JobPhase.running.value))
        for p in JobPhase:
            self.phase.labels(**lb, phase=p.value).set(1.0 if p.value == phase else 0.0)
        last = state.get("last_metrics")
        if not isinstance(last, Mapping):
            return
        for g, name in ((self.accuracy, "accuracy"), (self.loss, "loss")):
            for source, key in (("server", name), ("federated", f"federated_{name}")):
                if (v := _number(last.get(key))) is not None:
                    g.labels(**lb, source=source).set(v)
        if self._dp and (eps := _number(last.get("epsilon"))) is not None:
            self.epsilon.labels(**lb).set(eps)


def update_size_histogram(registry: CollectorRegistry, job: FLJob) -> Callable[[int], None]:
    """The aggregator's ``fedfleet_update_size_bytes``: one observation per report body."""
    child = Histogram(
        "fedfleet_update_size_bytes",
        "Bytes of each device update body an aggregator received",
        list(JOB_LABELS),
        buckets=UPDATE_BYTES_BUCKETS,
        registry=registry,
    ).labels(**job_labels(job))
    return child.observe


FOLD_SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    float("inf"),
)


def fold_seconds_histogram(registry: CollectorRegistry, job: FLJob) -> Callable[[float], None]:
    """The aggregator's ``fedfleet_fold_seconds``: validating and folding each accepted report
    (with ``fedfleet_update_size_bytes``: reports/s, bytes/s and fold time by ``rate()``)."""
    child = Histogram(
        "fedfleet_fold_seconds",
        "Seconds an aggregator spent decoding, validating and folding each accepted update",
        list(JOB_LABELS),
        buckets=FOLD_SECONDS_BUCKETS,
        registry=registry,
    ).labels(**job_labels(job))
    return child.observe


class _TimedStore:
    """Every method call of the wrapped store observed in ``fedfleet_store_seconds{op}``.

    A few microseconds per call against a Redis round trip of a hundred or more; the selector's
    check-in hot path makes no store call, so it pays nothing.
    """

    def __init__(self, store: Store, histogram: Histogram) -> None:
        self._store = store
        self._histogram = histogram
        self._methods: dict[str, Callable[..., Any]] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name.startswith("_") or not callable(attr):
            return attr
        timed = self._methods.get(name)
        if timed is None:
            observe = self._histogram.labels(op=name).observe

            def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return attr(*args, **kwargs)
                finally:
                    observe(time.perf_counter() - started)

            self._methods[name] = timed
        return timed


def timed_store(store: Store, registry: CollectorRegistry) -> Store:
    """``store`` with each call's seconds in ``fedfleet_store_seconds{op}`` of ``registry``."""
    histogram = Histogram(
        "fedfleet_store_seconds",
        "Seconds of each call this actor made to the shared store, by method",
        ["op"],
        buckets=STORE_SECONDS_BUCKETS,
        registry=registry,
    )
    return cast(Store, _TimedStore(store, histogram))
