"""Status conditions of an FLJob: their types and reasons as named constants, and merging.

Kubernetes convention (and Kubeflow's practice): ``lastTransitionTime`` records when a
condition's *status* last changed, so it must survive every rewrite that leaves the status as
it was, even when the reason or message change. :func:`merge_conditions` is the one place that
rule lives; every handler builds conditions with :func:`condition` and merges them here.

The list is keyed by ``type`` (the CRD declares it a map list) and ordered so that its last
entry is the condition that says what the job is doing now (:func:`current_type`): the
``State`` printer column shows ``.status.conditions[-1:].reason``, as Kubeflow's training
operators show their last condition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal, NamedTuple, TypedDict

__all__ = [
    "COMPLETE",
    "CONDITION_ORDER",
    "FAILED",
    "INVALID",
    "READY",
    "SUSPENDED",
    "Condition",
    "ConditionSpec",
    "ConditionStatus",
    "Reason",
    "condition",
    "current_type",
    "failure_reason",
    "find_condition",
    "merge_conditions",
    "rfc3339",
]

READY: Final = "Ready"
"""True while the job's coordinator reports progress through a reachable store."""
INVALID: Final = "Invalid"
"""True while the spec passes the CRD schema but not ``FLJobSpec``'s cross-field checks."""
SUSPENDED: Final = "Suspended"
"""True while ``spec.suspend`` holds the actors at zero replicas."""
COMPLETE: Final = "Complete"
"""True once the job has succeeded (``kubectl wait --for=condition=Complete``)."""
FAILED: Final = "Failed"
"""True once the job has failed; its reason says why (``DeadlineExceeded``, ...)."""

CONDITION_ORDER: Final = (READY, INVALID, SUSPENDED, COMPLETE, FAILED)
"""The order conditions appear in, so status patches compare equal when nothing changed
(but for the current one, which goes last: see :func:`current_type`)."""

STATE_PRECEDENCE: Final = (FAILED, COMPLETE, INVALID, SUSPENDED, READY)
"""Which True condition describes the job when several are: a finished job is finished even
if its last spec was invalid; an Invalid spec matters more than a suspension or progress."""

ConditionStatus = Literal["True", "False", "Unknown"]


class Reason:
    """Condition reasons (CamelCase, as Kubernetes requires). Also used as Event reasons."""

    WAITING_FOR_COORDINATOR: Final = "WaitingForCoordinator"
    RUNNING: Final = "Running"
    STORE_UNAVAILABLE: Final = "StoreUnavailable"
    INVALID_SPEC: Final = "InvalidSpec"
    VALID_SPEC: Final = "ValidSpec"
    SUSPENDED: Final = "Suspended"
    NOT_SUSPENDED: Final = "NotSuspended"
    RESUMED: Final = "Resumed"
    IN_PROGRESS: Final = "InProgress"
    ROUNDS_COMPLETED: Final = "RoundsCompleted"
    TARGET_ACCURACY_REACHED: Final = "TargetAccuracyReached"
    EPSILON_BUDGET_SPENT: Final = "EpsilonBudgetSpent"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"
    DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
    """``spec.activeDeadlineSeconds`` passed before the job finished."""
    COMMIT_FAILURES: Final = "CommitFailures"
    """The master could not evaluate or commit for ``rounds.maxCommitFailures`` attempts."""
    JOB_FAILED: Final = "JobFailed"
    """The coordinator reported a failure of another kind; the message carries its words."""
    TTL_EXPIRED: Final = "TTLExpired"
    """``spec.ttlSecondsAfterFinished`` passed: the finished job is being removed."""
    CHILDREN_APPLIED: Final = "ChildrenApplied"
    CLEANUP_SKIPPED: Final = "StoreCleanupSkipped"
    CLEANED_UP: Final = "StoreCleanedUp"
    MODELS_KEPT: Final = "StoredModelsKept"
    """``deleteWithJob`` asked for the models to go, but they are on a volume the operator
    cannot reach (a filesystem in the job's pods)."""


class Condition(TypedDict):
    """One entry of ``.status.conditions`` as it is stored."""

    type: str
    status: ConditionStatus
    reason: str
    message: str
    lastTransitionTime: str


class ConditionSpec(NamedTuple):
    """A condition as a handler wants it; :func:`merge_conditions` adds the time."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""


def rfc3339(moment: datetime | float) -> str:
    """A UTC timestamp as Kubernetes writes them: ``2024-05-01T12:00:00Z`` (whole seconds)."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, tz=UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_STORE_FAILURES: Final = {
    "deadlineexceeded": Reason.DEADLINE_EXCEEDED,
    "commitfailures": Reason.COMMIT_FAILURES,
}
"""The job record's failure reasons (``deadline-exceeded``, ``commit-failures``; spelled either
way) and the condition reason each becomes."""


def failure_reason(store_reason: object) -> str:
    """The ``Failed`` condition's reason for the ``reason`` a failed job's record carries."""
    key = str(store_reason or "").replace("-", "").replace("_", "").lower()
    return _STORE_FAILURES.get(key, Reason.JOB_FAILED)


def condition(
    type_: str, status: bool | ConditionStatus, reason: str, message: str = ""
) -> ConditionSpec:
    """A :class:`ConditionSpec`; ``status`` may be a bool."""
    if isinstance(status, bool):
        status = "True" if status else "False"
    return ConditionSpec(type_, status, reason, message)


def find_condition(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    """The condition of a type in a (stored) list, or ``None``."""
    return next((c for c in conditions if c.get("type") == type_), None)


def merge_conditions(
    previous: Sequence[Mapping[str, Any]] | None,
    updates: Iterable[ConditionSpec],
    *,
    now: datetime,
) -> list[Condition]:
    """The new condition list: ``updates`` applied over ``previous``.

    A condition whose status is unchanged keeps its ``lastTransitionTime`` (its reason and
    message are still refreshed); a new or flipped one gets ``now``. Conditions of types not in
    ``updates`` are kept as they were. Known types come first in :data:`CONDITION_ORDER`.
    """
    stamp = rfc3339(now)
    merged: dict[str, Condition] = {}
    for old in previous or ():
        type_ = str(old.get("type", ""))
        if type_:
            merged[type_] = Condition(
                type=type_,
                status=_status(old.get("status")),
                reason=str(old.get("reason", "")),
                message=str(old.get("message", "")),
                lastTransitionTime=str(old.get("lastTransitionTime") or stamp),
            )
    for new in updates:
        old_cond = merged.get(new.type)
        unchanged = old_cond is not None and old_cond["status"] == new.status
        merged[new.type] = Condition(
            type=new.type,
            status=new.status,
            reason=new.reason,
            message=new.message,
            lastTransitionTime=old_cond["lastTransitionTime"]
            if unchanged and old_cond is not None
            else stamp,
        )

    last = current_type(merged.values())

    def order(c: Condition) -> tuple[int, int, str]:
        t = c["type"]
        known = CONDITION_ORDER.index(t) if t in CONDITION_ORDER else len(CONDITION_ORDER)
        return (int(t == last), known, t)

    return sorted(merged.values(), key=order)


def current_type(conditions: Iterable[Mapping[str, Any]]) -> str | None:
    """The type of the condition that describes the job now: the True one first in
    :data:`STATE_PRECEDENCE`, else ``Ready`` (False, its reason saying why: waiting for the
    coordinator, the store unreachable, ...), else none."""
    by_type = {str(c.get("type")): c for c in conditions}
    for type_ in STATE_PRECEDENCE:
        if type_ in by_type and by_type[type_].get("status") == "True":
            return type_
    return READY if READY in by_type else None


def _status(raw: object) -> ConditionStatus:
    if raw == "True" or raw is True:
        return "True"
    if raw == "False" or raw is False:
        return "False"
    return "Unknown"
