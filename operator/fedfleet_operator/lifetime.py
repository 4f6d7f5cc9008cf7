"""A job's lifetime, the Kubeflow way: ``activeDeadlineSeconds`` and ``ttlSecondsAfterFinished``.

Both are decided from the FLJob alone — its spec and its status — and the time, so every
handler, and an operator that restarted, reaches the same decision (level-triggered):

- the deadline counts from ``status.startTime``, which :func:`~fedfleet_operator.status.
  active_since` sets when the job is created and resets when it is resumed; it is stopped while
  the job is suspended. The coordinator enforces it on its own clock (it is told where the clock
  started through ``FEDFLEET_ACTIVE_SINCE``); :func:`end_past_deadline` is the operator's
  backstop for a job whose coordinator is not running at all (pods that never start), which
  would otherwise stay Pending forever;
- the TTL counts from ``status.completionTime`` (else from the transition of ``Complete`` or
  ``Failed`` to True).

Because a job removed by its TTL leaves its keys in the store, a new FLJob of the same name
finds a finished record there that is not its own (:func:`leftover_problem`): it is held back,
with the reason in its ``Invalid`` condition, until that record is removed — deleting the new
FLJob does it (its finalizer cleans the key), after which it can be created again.

The functions above :func:`end_past_deadline` are pure; it is the one that touches the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from fedfleet.core.roles import DEADLINE_EXCEEDED, JobPhase
from fedfleet.store.base import Store
from fedfleet_operator.conditions import COMPLETE, FAILED, find_condition

__all__ = [
    "OPERATOR_HOLDER",
    "deadline_at",
    "end_past_deadline",
    "leftover_problem",
    "parse_time",
    "past_deadline",
    "ttl_expired",
    "ttl_expires_at",
]

OPERATOR_HOLDER: Final = "fedfleet-operator"
"""Who holds a job's lease while the operator ends it (the store's lease holder name)."""

_TERMINAL: Final = frozenset({JobPhase.succeeded.value, JobPhase.failed.value})


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp of the status (``2025-03-01T12:00:00Z``), or ``None``."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _seconds(spec: Mapping[str, Any], field: str) -> int | None:
    value = spec.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def deadline_at(spec: Mapping[str, Any], status: Mapping[str, Any]) -> datetime | None:
    """When the job's deadline passes: ``status.startTime`` + ``spec.activeDeadlineSeconds``;
    ``None`` without a deadline, or while the clock is stopped (suspended, finished, never
    started)."""
    seconds = _seconds(spec, "activeDeadlineSeconds")
    started = parse_time(status.get("startTime"))
    if seconds is None or started is None or spec.get("suspend"):
        return None
    if status.get("phase") in _TERMINAL or status.get("phase") == JobPhase.suspended.value:
        return None
    return started + timedelta(seconds=seconds)


def past_deadline(spec: Mapping[str, Any], status: Mapping[str, Any], now: datetime) -> bool:
    at = deadline_at(spec, status)
    return at is not None and now >= at


def ttl_expires_at(spec: Mapping[str, Any], status: Mapping[str, Any]) -> datetime | None:
    """When a finished job is removed: its completion + ``spec.ttlSecondsAfterFinished``;
    ``None`` without a TTL or while the job has not finished."""
    seconds = _seconds(spec, "ttlSecondsAfterFinished")
    if seconds is None or status.get("phase") not in _TERMINAL:
        return None
    finished = parse_time(status.get("completionTime"))
    if finished is None:
        for type_ in (COMPLETE, FAILED):
            cond = find_condition(status.get("conditions") or [], type_) or {}
            if cond.get("status") == "True":
                finished = parse_time(cond.get("lastTransitionTime"))
    if finished is None:
        return None
    return finished + timedelta(seconds=seconds)


def ttl_expired(spec: Mapping[str, Any], status: Mapping[str, Any], now: datetime) -> bool:
    at = ttl_expires_at(spec, status)
    return at is not None and now >= at


def leftover_problem(state: Mapping[str, Any], created: object, key: str, fetch: str) -> str | None:
    """Why the store's record under ``key`` cannot be this FLJob's, or ``None``: a job that
    finished before the FLJob (``metadata.creationTimestamp`` = ``created``) was created is an
    earlier FLJob's, kept after its ``ttlSecondsAfterFinished``."""
    born = parse_time(created)
    finished = state.get("completion_time")
    if state.get("phase") not in _TERMINAL or born is None:
        return None
    if not isinstance(finished, int | float) or finished >= born.timestamp():
        return None
    return (
        f"the store still holds an earlier job named {key}, which finished before this FLJob "
        f"was created (kept after its ttlSecondsAfterFinished): fetch its model if you need it "
        f"({fetch}), then delete this FLJob, which removes that record, and create it again"
    )


def end_past_deadline(store: Store, key: str, *, now: float, lease_ttl: float) -> bool:
    """End a job past its deadline in the store (Failed, ``deadline-exceeded``) when no
    coordinator holds it; True if this call ended it.

    The operator takes the job's lease like a coordinator would: while a coordinator holds it,
    it ends the job itself (it knows the same deadline), so nothing is done here; once the
    operator holds it, its fencing token also refuses any coordinator that started late.
    """
    token = store.acquire_lease(key, OPERATOR_HOLDER, lease_ttl)
    if token is None:
        return False
    try:
        state = store.job_state(key)
        if state.get("phase") in _TERMINAL:
            return False
        ended = {
            **state,
            "phase": JobPhase.failed.value,
            "reason": DEADLINE_EXCEEDED,
            "completion_time": now,
        }
        ended.setdefault("start_time", now)
        store.put_job_state(key, token, ended)
        return True
    finally:
        store.release_lease(key, OPERATOR_HOLDER, token)
