"""Pure computation of an FLJob's ``.status``: from the store's records, or from its spec.

Pods never write the Kubernetes API; the coordinator writes a small job record to the store
(``job_state``: phase, round, rounds, model version, start and completion times, the reason it
finished) and every commit appends the round's metrics (``metrics``: accuracy, loss, reports).
The operator's status timer reads both and this module maps them onto the status of
``operator/CONTRACT.md``; the create and update handlers use :func:`spec_status` for what they
know before the coordinator reports. Everything takes ``now`` as an argument, so tests pin it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NotRequired, TypedDict, cast

from fedfleet.core.model_history import CheckpointsSpec, best_version
from fedfleet.core.roles import JobPhase
from fedfleet_operator.conditions import (
    COMPLETE,
    FAILED,
    INVALID,
    READY,
    SUSPENDED,
    Condition,
    ConditionSpec,
    Reason,
    condition,
    failure_reason,
    find_condition,
    merge_conditions,
    rfc3339,
)
from fedfleet_operator.naming import secret_name
from fedfleet_operator.settings import redact_store_url

__all__ = [
    "TERMINAL_PHASES",
    "FLJobStatus",
    "LastRound",
    "ModelLocation",
    "active_since",
    "changed_fields",
    "failure_reason",
    "fetch_command",
    "model_location",
    "phase_from_store",
    "spec_status",
    "status_from_store",
    "store_unavailable_status",
]

TERMINAL_PHASES = frozenset({JobPhase.succeeded.value, JobPhase.failed.value})
"""Phases after which nothing about the job changes any more."""

_DIGITS = 4
"""Accuracy and loss are rounded for ``kubectl get``; the store keeps full precision."""


class LastRound(TypedDict):
    round: int
    accuracy: NotRequired[float]
    loss: NotRequired[float]
    reports: NotRequired[int]
    epsilon: NotRequired[float]


class BestModel(TypedDict):
    """The best kept model by ``spec.checkpoints.metric``."""

    version: int
    round: int
    metric: str
    value: float


class ModelLocation(TypedDict):
    """Where the newest model is kept, and the command that fetches it."""

    store: str
    key: str
    version: int
    fetch: str
    best: NotRequired[BestModel]
    fetchBest: NotRequired[str]


class FLJobStatus(TypedDict, total=False):
    phase: str
    round: int
    rounds: int
    modelVersion: int
    accuracy: float
    epsilon: float
    lastRound: LastRound
    startTime: str
    completionTime: str
    observedGeneration: int
    conditions: list[Condition]
    model: ModelLocation
    aggregators: dict[str, Any]
    """The aggregator pool (:class:`fedfleet_operator.pool.AggregatorStatus`)."""


# -- model location -----------------------------------------------------------------------------


def fetch_command(
    store_url: str, key: str, output: str = "model.safetensors", version: str | None = None
) -> str:
    """The command that fetches the job's model: the store URL without its password, which
    ``--store-secret`` reads from the job's Secret (with kubectl) when the command runs."""
    namespace, _, name = key.partition("/")
    chosen = f" --version {version}" if version else ""
    return (
        f"fedfleet fetch-model --store {redact_store_url(store_url)} "
        f"--store-secret {namespace}/{secret_name(name)} --job {key}{chosen} -o {output}"
    )


def model_location(
    key: str,
    store_url: str,
    version: int,
    metrics: Sequence[Mapping[str, Any]] = (),
    checkpoints: CheckpointsSpec | None = None,
) -> ModelLocation:
    """The model is in the store under the job key; the URL is shown without a password.

    With ``metrics`` (the store's committed rounds), the best kept model by
    ``spec.checkpoints`` is named too, with the command that fetches it.
    """
    location: ModelLocation = {
        "store": redact_store_url(store_url),
        "key": key,
        "version": version,
        "fetch": fetch_command(store_url, key),
    }
    policy = checkpoints or CheckpointsSpec()
    best = best_version(metrics, policy.metric, policy.mode) if policy.keep_best else None
    if best is not None and best.value is not None:
        location["best"] = {
            "version": best.version,
            "round": best.round,
            "metric": policy.metric,
            "value": best.value,
        }
        location["fetchBest"] = fetch_command(store_url, key, "best.safetensors", "best")
    return location


# -- from the store -------------------------------------------------------------------------------


def phase_from_store(job_state: Mapping[str, Any], *, suspended: bool) -> JobPhase:
    """Pending until the coordinator reports; the store's phase after; Suspended while the
    spec says so, unless the job already finished (a finished job stays finished)."""
    try:
        reported: JobPhase | None = JobPhase(str(job_state.get("phase")))
    except ValueError:
        reported = None
    if reported in (JobPhase.succeeded, JobPhase.failed):
        return reported
    if suspended:
        return JobPhase.suspended
    return reported or JobPhase.pending


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return round(float(value), _DIGITS)


def _last_round(last: Mapping[str, Any], round_: int) -> LastRound:
    out: LastRound = {"round": _int(last.get("round"), round_)}
    accuracy, loss = _number(last.get("accuracy")), _number(last.get("loss"))
    if accuracy is not None:
        out["accuracy"] = accuracy
    if loss is not None:
        out["loss"] = loss
    if isinstance(last.get("reports"), int):
        out["reports"] = int(last["reports"])
    epsilon = _number(last.get("epsilon"))
    if epsilon is not None:
        out["epsilon"] = epsilon
    return out


def _ready(
    phase: JobPhase, *, round_: int, rounds: int | None, invalid: str | None
) -> ConditionSpec:
    of = f" of {rounds}" if rounds else ""
    if phase is JobPhase.running:
        return condition(READY, True, Reason.RUNNING, f"the coordinator reports round {round_}{of}")
    if phase is JobPhase.suspended:
        return condition(READY, False, Reason.SUSPENDED, "actors are scaled to zero")
    if phase is JobPhase.succeeded:
        return condition(READY, False, Reason.SUCCEEDED, "the job finished; its actors are gone")
    if phase is JobPhase.failed:
        return condition(READY, False, Reason.FAILED, "the job failed; see the Failed condition")
    if invalid is not None:
        return condition(READY, False, Reason.INVALID_SPEC, "the spec is invalid; see Invalid")
    return condition(
        READY, False, Reason.WAITING_FOR_COORDINATOR, "waiting for the coordinator to report"
    )


def _complete(phase: JobPhase, job_state: Mapping[str, Any], round_: int) -> ConditionSpec:
    if phase is JobPhase.succeeded:
        if job_state.get("reason") == "target":
            return condition(
                COMPLETE,
                True,
                Reason.TARGET_ACCURACY_REACHED,
                f"target accuracy reached after {round_} rounds",
            )
        if job_state.get("reason") == "epsilon-budget":
            return condition(
                COMPLETE,
                True,
                Reason.EPSILON_BUDGET_SPENT,
                f"the privacy budget allows no round after round {round_}",
            )
        return condition(COMPLETE, True, Reason.ROUNDS_COMPLETED, f"{round_} rounds committed")
    if phase is JobPhase.failed:
        return condition(COMPLETE, False, Reason.FAILED, "the job failed; see the Failed condition")
    return condition(COMPLETE, False, Reason.IN_PROGRESS, "")


def _failed(phase: JobPhase, job_state: Mapping[str, Any], round_: int) -> ConditionSpec:
    if phase is JobPhase.failed:
        said = str(job_state.get("reason") or "")
        reason = failure_reason(said)
        if reason == Reason.DEADLINE_EXCEEDED:
            message = f"spec.activeDeadlineSeconds passed after {round_} rounds"
        elif reason == Reason.COMMIT_FAILURES:
            message = (
                f"{_int(job_state.get('commit_failures'))} consecutive attempts could not be "
                f"committed after round {round_} (spec.rounds.maxCommitFailures)"
            )
        else:
            message = f"the coordinator reported failure: {said or 'no reason given'}"
        if error := str(job_state.get("last_error") or ""):
            message = f"{message}; last error: {error[:500]}"
        return condition(FAILED, True, reason, message)
    if phase is JobPhase.succeeded:
        return condition(FAILED, False, Reason.SUCCEEDED, "")
    return condition(FAILED, False, Reason.IN_PROGRESS, "")


def _invalid(invalid: str | None) -> ConditionSpec:
    if invalid is None:
        return condition(INVALID, False, Reason.VALID_SPEC, "")
    return condition(INVALID, True, Reason.INVALID_SPEC, invalid)


def _suspended(suspended: bool, previous: Sequence[Mapping[str, Any]]) -> ConditionSpec:
    if suspended:
        return condition(SUSPENDED, True, Reason.SUSPENDED, "spec.suspend is true")
    before = find_condition(previous, SUSPENDED) or {}
    if before.get("status") == "True" or before.get("reason") == Reason.RESUMED:
        return condition(SUSPENDED, False, Reason.RESUMED, "resumed from the last checkpoint")
    return condition(SUSPENDED, False, Reason.NOT_SUSPENDED, "")


def active_since(previous: Mapping[str, Any] | None, *, suspended: bool, now: datetime) -> str:
    """``status.startTime``: when the job's current active period began, where
    ``spec.activeDeadlineSeconds`` counts from (as a Kubernetes Job's ``startTime``).

    Set when the job is created, or first resumed if it was created suspended; reset when a
    Suspended job is resumed; kept otherwise (also while suspended, though the clock is then
    stopped). Empty while a job created suspended was never resumed.
    """
    prev = previous or {}
    kept = str(prev.get("startTime") or "")
    if suspended or str(prev.get("phase") or "") in TERMINAL_PHASES:
        return kept
    if not kept or prev.get("phase") == JobPhase.suspended.value:
        return rfc3339(now)
    return kept


def status_from_store(
    job_state: Mapping[str, Any],
    metrics: Sequence[Mapping[str, Any]],
    *,
    key: str,
    store_url: str,
    generation: int | None,
    now: datetime,
    previous: Mapping[str, Any] | None = None,
    suspended: bool = False,
    invalid: str | None = None,
    rounds_total: int | None = None,
    checkpoints: CheckpointsSpec | None = None,
) -> FLJobStatus:
    """The whole status from the store's job record and metrics history.

    ``previous`` is the current ``.status`` (its conditions keep their transition times, its
    ``startTime`` — the operator's, see :func:`active_since` — is kept; the store's start time
    only stands in for a status that has none); ``suspended``, ``invalid`` (the validation
    message, if any) and ``rounds_total`` come from the current spec, the latter used until
    the coordinator reports the rounds it runs; ``checkpoints`` (the spec's) ranks the best
    model.
    """
    last: Mapping[str, Any] = metrics[-1] if metrics else (job_state.get("last_metrics") or {})
    version = max(_int(job_state.get("model_version")), _int(last.get("model_version")))
    round_ = max(_int(job_state.get("round")), _int(last.get("round")), version)
    rounds = _int(job_state.get("rounds")) or rounds_total
    prev = previous or {}
    # Leaving Suspended is the change handlers' (they scale the actors back and restart the
    # deadline's clock); until one has, the job is still suspended.
    suspended = suspended or prev.get("phase") == JobPhase.suspended.value
    phase = phase_from_store(job_state, suspended=suspended)

    status: FLJobStatus = {"phase": phase.value, "round": round_, "modelVersion": version}
    if rounds:
        status["rounds"] = rounds
    if generation is not None:
        status["observedGeneration"] = generation
    if last:
        status["lastRound"] = _last_round(last, round_)
        accuracy = _number(last.get("accuracy"))
        if accuracy is not None:
            status["accuracy"] = accuracy
        epsilon = _number(last.get("epsilon"))
        if epsilon is not None:
            status["epsilon"] = epsilon
    if prev.get("startTime"):
        status["startTime"] = str(prev["startTime"])
    elif isinstance(job_state.get("start_time"), int | float):
        status["startTime"] = rfc3339(float(job_state["start_time"]))
    if phase.value in TERMINAL_PHASES and isinstance(job_state.get("completion_time"), int | float):
        status["completionTime"] = rfc3339(float(job_state["completion_time"]))
    if version > 0:
        status["model"] = model_location(key, store_url, version, metrics, checkpoints)
        known = prev.get("model") or {}
        if "best" not in status["model"] and "best" in known and not metrics:
            # metrics are read only after a commit: keep the best named until then
            status["model"]["best"] = known["best"]
            status["model"]["fetchBest"] = known.get("fetchBest", "")
    previous_conditions = prev.get("conditions") or []
    status["conditions"] = merge_conditions(
        previous_conditions,
        [
            _ready(phase, round_=round_, rounds=rounds, invalid=invalid),
            _invalid(invalid),
            _suspended(suspended, previous_conditions),
            _complete(phase, job_state, round_),
            _failed(phase, job_state, round_),
        ],
        now=now,
    )
    return status


def store_unavailable_status(
    previous: Mapping[str, Any] | None, message: str, *, now: datetime
) -> FLJobStatus:
    """The previous status, unchanged but for ``Ready``: False, ``StoreUnavailable``.

    Progress cannot be read, so nothing else is guessed: the phase, round and accuracy keep
    their last known values until the store answers again.
    """
    status = cast(FLJobStatus, dict(previous or {}))
    status["conditions"] = merge_conditions(
        (previous or {}).get("conditions"),
        [condition(READY, False, Reason.STORE_UNAVAILABLE, message)],
        now=now,
    )
    return status


# -- from the spec -------------------------------------------------------------------------------


def spec_status(
    previous: Mapping[str, Any] | None,
    *,
    generation: int | None,
    now: datetime,
    invalid: str | None = None,
    suspended: bool = False,
    rounds_total: int | None = None,
) -> FLJobStatus:
    """What the create and update handlers know before the store does.

    A new job is Pending; suspending a job that has not finished makes it Suspended at once,
    resuming makes it Pending until the coordinator reports again. An invalid spec leaves the
    phase as it was (a running job keeps running its last valid spec) and sets ``Invalid``.
    """
    prev = previous or {}
    prev_phase = str(prev.get("phase") or "")
    if prev_phase in TERMINAL_PHASES:
        phase = prev_phase
    elif invalid is not None:
        phase = prev_phase or JobPhase.pending.value
    elif suspended:
        phase = JobPhase.suspended.value
    elif prev_phase in ("", JobPhase.suspended.value):
        phase = JobPhase.pending.value
    else:
        phase = prev_phase
    status: FLJobStatus = {"phase": phase}
    if generation is not None:
        status["observedGeneration"] = generation
    if invalid is None and rounds_total is not None and "rounds" not in prev:
        status["rounds"] = rounds_total
    if "round" not in prev:
        status["round"] = 0
    conditions = prev.get("conditions") or []
    if invalid is None:
        started = active_since(prev, suspended=suspended, now=now)
        if started:
            status["startTime"] = started
    updates = [_invalid(invalid)]
    if invalid is None:
        updates.append(_suspended(suspended, conditions))
    if phase not in TERMINAL_PHASES:
        # Ready only when the phase moved, was never said, or is Pending (whose reason says
        # whether the spec is invalid): otherwise it is the status timer's, whose message names
        # the round, and rewriting it here would make it flap.
        if (
            phase != prev_phase
            or phase == JobPhase.pending.value
            or find_condition(conditions, READY) is None
        ):
            ready = _ready(
                JobPhase(phase), round_=_int(prev.get("round")), rounds=None, invalid=invalid
            )
            updates.append(ready)
        if find_condition(conditions, COMPLETE) is None:
            updates.append(_complete(JobPhase(phase), {}, 0))
        if find_condition(conditions, FAILED) is None:
            updates.append(_failed(JobPhase(phase), {}, 0))
    status["conditions"] = merge_conditions(prev.get("conditions"), updates, now=now)
    return status


def changed_fields(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level fields of ``new`` that differ from ``previous``: the status merge patch.

    Writing only what changed keeps an idle job from costing an API write (and a watch event
    for every client) on every timer tick.
    """
    prev = previous or {}
    return {k: v for k, v in new.items() if prev.get(k) != v}
